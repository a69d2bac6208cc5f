"""``Monitor``: one training process's connection to the vcid daemon.

Owns the channel, run creation, the bounded outbox of feature batches, the
background sender thread that feeds them into client-streaming ``Push`` calls,
reconnects with safe resends, and the unary calls (``CloseEpoch``,
``PushStats``, ``GetHistory``, ``GetRun``, ``Watch``). Must not compute
statistics (``LocalAccumulator``) or validate arrays itself (``_arrays``).

Delivery model
--------------
``push()`` validates and encodes the batch in the caller's thread, stamps it
with this Monitor's ``writer_id`` and the next ``sequence`` number, and puts
it in a bounded outbox. One sender thread drains the outbox into a single
open ``Push`` stream. A stream is ended (and its ``PushSummary`` awaited)
when someone flushes (``flush``, ``close_epoch``, ``close``), when the outbox
has been idle for ``ack_interval`` seconds, or when it carries half of the
outbox bound; only then are its batches forgotten. The bound (``queue_size``
batches, ``queue_bytes`` bytes) counts every batch until it is confirmed, so
a slow or unreachable daemon makes ``push`` wait (``queue_timeout``, then
``QueueFullError``) instead of growing memory. If the
stream breaks with ``UNAVAILABLE`` (daemon restarting, connection lost) the
sender reconnects and resends every unconfirmed batch with its original
``(writer_id, sequence)``; the daemon skips those it already applied, so
nothing is counted twice. Any other error (the daemon rejected a batch) is
kept and raised as ``VcidError`` by the next call on this Monitor; the
batches this Monitor still held at that moment are discarded, and the
error's ``context`` says how many.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import grpc
import numpy as np

from ._accumulator import LocalAccumulator, _check_shape_args
from ._arrays import (
    ENCODINGS,
    Features,
    check_encoding,
    check_epoch,
    check_features,
    check_labels,
    check_name,
    encode,
    feature_rows_per_message,
)
from ._errors import QueueFullError, VcidError
from ._result import EpochResult, PushSummary, RunInfo
from .v1 import vcid_pb2 as pb
from .v1 import vcid_pb2_grpc as pb_grpc

log = logging.getLogger("vcid")

DEFAULT_SPLIT = "train"
DEFAULT_LAYER = "penultimate"

# Only transport-level unavailability is retried: every other status means
# the daemon looked at the request and refused it, and a retry would fail
# the same way.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 256 << 20),
    # gRPC's default reconnect backoff grows to 120 s; a restarted daemon
    # should be found again within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_permit_without_calls", 0),
]


class _Flush:
    """A marker in the outbox: set once every batch queued before it is confirmed."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


class _Outbox:
    """Bounded FIFO of batches (and flush markers) between callers and the
    sender thread.

    The bound counts every batch this Monitor holds, from ``put_all`` until
    the sender ``release``-s it (confirmed by the daemon, or discarded after
    an error): queued batches and batches sent but not yet confirmed alike.
    So memory stays bounded and a slow or unreachable daemon pushes back on
    ``push()`` instead of piling up resend buffers. Markers are not counted.
    """

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._held = 0
        self._held_bytes = 0

    def put_all(self, batches: Sequence[pb.FeatureBatch], timeout: Optional[float]) -> bool:
        """Queue all ``batches`` together (or none): False on timeout. A
        group larger than the whole bound is let in when nothing is held."""
        need_n = len(batches)
        need_b = sum(len(b.features) for b in batches)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._held and (
                self._held + need_n > self.max_batches
                or self._held_bytes + need_b > self.max_bytes
            ):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._items.extend(batches)
            self._held += need_n
            self._held_bytes += need_b
            self._cond.notify_all()
            return True

    def put_marker(self, marker: _Flush) -> None:
        with self._cond:
            self._items.append(marker)
            self._cond.notify_all()

    def get(self, timeout: float) -> Any:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
                if not self._items:
                    return None
            return self._items.popleft()

    def push_front(self, items: Sequence[Any]) -> None:
        """Return taken items to the front, in order (still held)."""
        with self._cond:
            self._items.extendleft(reversed(items))
            self._cond.notify_all()

    def drain_batches(self) -> List[pb.FeatureBatch]:
        """Take every queued batch out (markers stay, in order); the caller
        must ``release`` them."""
        with self._cond:
            batches = [i for i in self._items if isinstance(i, pb.FeatureBatch)]
            self._items = deque(i for i in self._items if not isinstance(i, pb.FeatureBatch))
            return batches

    def release(self, batches: Sequence[pb.FeatureBatch]) -> None:
        """These batches are no longer held (confirmed or discarded)."""
        if not batches:
            return
        with self._cond:
            self._held -= len(batches)
            self._held_bytes -= sum(len(b.features) for b in batches)
            self._cond.notify_all()

    @property
    def held(self) -> int:
        with self._cond:
            return self._held


class _InternalFailure:
    """An unexpected local exception in the sender, shaped like a gRPC error
    so that it is reported through the same path."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL

    def details(self) -> str:
        return f"vcid client sender thread failed: {self._exc!r}"


class _Stream:
    """Book-keeping of one ``Push`` call: what it carried and who waits on it."""

    def __init__(self, resend: List[pb.FeatureBatch]) -> None:
        self.lock = threading.Lock()
        self.resend = resend
        self.sent: List[pb.FeatureBatch] = list(resend)
        self.bytes = sum(len(b.features) for b in resend)
        self.markers: List[_Flush] = []
        self.closed = False
        self.call: Any = None


class Monitor:
    """A connection to a vcid daemon for one run.

    ``Monitor(address, run, num_classes, feature_dim)`` connects, creates the
    run (or finds it, if it exists with the same ``num_classes`` and
    ``feature_dim``) and starts a background sender thread. Use it as a
    context manager, or call ``close()``: leaving the ``with`` block flushes
    every pushed batch and raises any error the daemon reported.

    Args:
        address: ``host:port`` of the daemon's gRPC listener.
        run: the run id (1-128 characters of ``[A-Za-z0-9_.:-]``).
        num_classes: K >= 2; labels must lie in ``[0, K)``.
        feature_dim: d >= 1, the number of feature columns.
        metadata: free-form string labels of the run (model, dataset, ...);
            kept as first given when the run already exists.
        encoding: wire encoding of the features: ``"float32"`` (exact for
            float32 input), ``"float16"`` or ``"bfloat16"`` (half the bytes;
            values are rounded to nearest-even, as torch does).
        token: bearer token when the daemon requires one.
        queue_size: most batches this Monitor holds, queued or sent but not
            yet confirmed by the daemon (each ``Push`` stream is ended and
            confirmed after half of it).
        queue_bytes: most feature bytes held the same way.
        queue_timeout: how long ``push`` blocks when the bound is reached
            before raising ``QueueFullError`` (``None``: wait forever). The
            batch is then not queued; nothing is ever dropped silently.
        timeout: deadline in seconds of unary calls (``CreateRun``,
            ``PushStats``, ``GetHistory``, ...) and of ``flush``.
        close_timeout: deadline of ``CloseEpoch`` (large d takes longer).
        reconnect_timeout: how long the sender keeps reconnecting after the
            daemon became unreachable before it gives up and reports an
            ``UNAVAILABLE`` error.
        ack_interval: an idle stream is ended (and its batches confirmed)
            after this many seconds without a new push.
        max_batch_bytes, max_batch_rows: larger pushes are split into several
            messages (all queued together); keep them within the daemon's
            ``--max-message-bytes`` and ``--max-batch-rows``.
        writer_id: the idempotence key of this Monitor's batches (default: a
            fresh UUID). Reuse one only to resend the same sequence numbers.
    """

    def __init__(
        self,
        address: str,
        run: str,
        num_classes: int,
        feature_dim: int,
        metadata: Optional[Mapping[str, Any]] = None,
        encoding: str = "float32",
        *,
        token: Optional[str] = None,
        queue_size: int = 64,
        queue_bytes: int = 256 << 20,
        queue_timeout: Optional[float] = 60.0,
        timeout: float = 60.0,
        close_timeout: float = 600.0,
        reconnect_timeout: float = 60.0,
        ack_interval: float = 1.0,
        max_batch_bytes: int = 16 << 20,
        max_batch_rows: int = 65536,
        writer_id: Optional[str] = None,
    ) -> None:
        self._closed = True  # until fully constructed, close() is a no-op
        self._run_id = check_name("run", run, 128)
        num_classes, feature_dim = _check_shape_args(num_classes, feature_dim)
        if not isinstance(address, str) or not address:
            raise ValueError(f"address: expected 'host:port', received {address!r}")
        self._encoding = check_encoding(encoding)
        self._enum, self._width = ENCODINGS[encoding]
        md: Dict[str, str] = {}
        for key, value in (metadata or {}).items():
            if not isinstance(key, str):
                raise ValueError(
                    f"metadata: expected string keys, received {type(key).__name__} {key!r}"
                )
            md[key] = value if isinstance(value, str) else str(value)
        if queue_size < 1:
            raise ValueError(f"queue_size: expected at least 1, received {queue_size}")
        self._writer_id = writer_id if writer_id is not None else uuid.uuid4().hex
        self._timeout = float(timeout)
        self._close_timeout = float(close_timeout)
        self._queue_timeout = queue_timeout
        self._reconnect_timeout = float(reconnect_timeout)
        self._ack_interval = float(ack_interval)
        self._max_batch_bytes = int(max_batch_bytes)
        self._max_batch_rows = int(max_batch_rows)
        self._call_md = [("authorization", f"Bearer {token}")] if token else None
        self._address = address
        self._stop = threading.Event()  # finish what is queued, then exit
        self._abort = threading.Event()  # exit now (close after a failed flush)

        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.VciMonitorStub(self._channel)
        try:
            run_msg = self._unary(
                self._stub.CreateRun,
                pb.CreateRunRequest(run_id=self._run_id, num_classes=num_classes,
                                    feature_dim=feature_dim, metadata=md),
                what="CreateRun",
            )
        except BaseException:
            self._channel.close()
            raise
        self._num_classes = run_msg.num_classes
        self._feature_dim = run_msg.feature_dim

        self._outbox = _Outbox(int(queue_size), int(queue_bytes))
        self._rotate_batches = max(1, int(queue_size) // 2)
        self._rotate_bytes = max(1, int(queue_bytes) // 2)
        self._push_lock = threading.Lock()
        self._sequence = 0
        self._stats_sequence = 0
        self._state_lock = threading.Lock()
        self._error: Optional[VcidError] = None
        self._confirmed = PushSummary()
        self._reconnects = 0
        self._unacked: List[pb.FeatureBatch] = []
        self._thread = threading.Thread(target=self._sender, name=f"vcid-sender-{run}",
                                        daemon=True)
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------ info

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    @property
    def encoding(self) -> str:
        return self._encoding

    @property
    def writer_id(self) -> str:
        return self._writer_id

    @property
    def pending(self) -> int:
        """Batches pushed and not yet confirmed by the daemon."""
        return self._outbox.held

    @property
    def confirmed(self) -> PushSummary:
        """Totals the daemon confirmed for this Monitor's ``push`` batches."""
        with self._state_lock:
            return self._confirmed

    @property
    def reconnects(self) -> int:
        """How many times the sender re-opened a broken ``Push`` stream."""
        with self._state_lock:
            return self._reconnects

    def run_info(self) -> RunInfo:
        """The run as the daemon knows it now (``GetRun``)."""
        self._check_usable()
        msg = self._unary(self._stub.GetRun, pb.GetRunRequest(run_id=self._run_id),
                          what="GetRun")
        return RunInfo.from_proto(msg)

    # ------------------------------------------------------------------ push

    def push(
        self,
        features: Any,
        labels: Any,
        epoch: int,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> None:
        """Queue one batch: ``features`` (rows × feature_dim) with ``labels``.

        ``features`` may be a numpy array, anything with ``__array__`` or a
        tensor with ``.detach().cpu().numpy()`` (a torch bfloat16 tensor is
        sent bit for bit when ``encoding="bfloat16"``); ``labels`` any integer
        array of length rows with values in ``[0, num_classes)``. Everything
        is checked here, before anything is sent (``ValueError``). The call
        returns once the batch is encoded and queued; if the outbox stays full
        for ``queue_timeout`` seconds it raises ``QueueFullError`` and the
        batch is not queued. Raises ``VcidError`` for an earlier failure the
        daemon reported.
        """
        self._check_usable()
        epoch = check_epoch(epoch)
        split = check_name("split", split, 64)
        layer = check_name("layer", layer, 64)
        f = check_features(features, self._feature_dim)
        rows = f.array.shape[0]
        y = check_labels(labels, rows, self._num_classes)
        self._enqueue(self._encode_batches(f, y, epoch, split, layer))

    def _encode_batches(self, f: Features, y: np.ndarray, epoch: int, split: str,
                        layer: str) -> List[pb.FeatureBatch]:
        rows = f.array.shape[0]
        per = feature_rows_per_message(self._feature_dim, self._width,
                                       self._max_batch_bytes, self._max_batch_rows)
        out = []
        for start in range(0, rows, per):
            stop = min(rows, start + per)
            part = f if (start == 0 and stop == rows) else Features(
                f.array[start:stop], f.is_bfloat16_bits)
            out.append(pb.FeatureBatch(
                run_id=self._run_id, split=split, layer=layer, epoch=epoch,
                rows=stop - start, features=encode(part, self._encoding),
                encoding=self._enum, labels=y[start:stop].tolist(),
                writer_id=self._writer_id,
            ))
        return out

    def _enqueue(self, batches: List[pb.FeatureBatch]) -> None:
        """Stamp ``batches`` with consecutive sequence numbers and queue them
        together. The lock keeps queue order equal to sequence order."""
        with self._push_lock:
            first = self._sequence + 1
            for i, b in enumerate(batches):
                b.writer_id = self._writer_id
                b.sequence = first + i
            if not self._outbox.put_all(batches, self._queue_timeout):
                raise QueueFullError(
                    f"push: expected room in the outbox within queue_timeout="
                    f"{self._queue_timeout}s, received none: {self.pending} batches are "
                    f"waiting for the daemon (queue_size/queue_bytes reached); the batch "
                    f"was not queued"
                )
            self._sequence = first + len(batches) - 1

    def _enqueue_batch_unchecked(self, batch: pb.FeatureBatch) -> None:
        """Queue a raw wire batch with no local checks (tests use it to make
        the daemon reject something)."""
        self._check_usable()
        self._enqueue([batch])

    def flush(self, timeout: Optional[float] = None) -> PushSummary:
        """Wait until every batch pushed so far is confirmed by the daemon.

        Ends the current ``Push`` stream and waits for its summary. Returns
        the running totals of this Monitor (``confirmed``); raises
        ``VcidError`` if the daemon rejected something.
        """
        self._check_usable()
        marker = _Flush()
        self._outbox.put_marker(marker)
        wait = self._timeout if timeout is None else timeout
        if not marker.event.wait(wait):
            raise VcidError(
                "DEADLINE_EXCEEDED",
                f"flush: expected the daemon to confirm the pushed batches within {wait}s, "
                f"received no confirmation ({self.pending} batches still queued)",
            )
        self._raise_pending()
        return self.confirmed

    # ----------------------------------------------------------- stats/close

    def push_stats(
        self,
        acc: Any,
        epoch: int,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> PushSummary:
        """Send a ``LocalAccumulator`` or a ``vcid.torch.TorchAccumulator``
        (``PushStats``: its §2.1 statistics and its ``unit_within_trace``);
        merged exactly into the open epoch.
        Retried safely (same idempotence key) while the daemon is
        unreachable. Returns the daemon's summary of this one call."""
        self._check_usable()
        epoch = check_epoch(epoch)
        split = check_name("split", split, 64)
        layer = check_name("layer", layer, 64)
        if hasattr(acc, "to_local"):  # vcid.torch.TorchAccumulator: one copy to the host
            acc = acc.to_local()
        if not isinstance(acc, LocalAccumulator):
            raise ValueError(f"acc: expected a vcid.LocalAccumulator or "
                             f"vcid.torch.TorchAccumulator, received {type(acc).__name__}")
        if (acc.num_classes, acc.feature_dim) != (self._num_classes, self._feature_dim):
            raise ValueError(
                f"acc: expected num_classes={self._num_classes}, feature_dim="
                f"{self._feature_dim} (the run's), received num_classes={acc.num_classes}, "
                f"feature_dim={acc.feature_dim}"
            )
        if acc.samples == 0:
            raise ValueError("acc: expected at least 1 sample, received an empty accumulator")
        with self._push_lock:
            self._stats_sequence += 1
            seq = self._stats_sequence
        # A sequence space of its own: stats blocks are sent from the caller's
        # thread, concurrently with the batch stream.
        block = acc.to_proto(self._run_id, split, layer, epoch,
                             writer_id=self._writer_id + ".stats", sequence=seq)
        msg = self._unary(self._stub.PushStats, block, what="PushStats", retry=True)
        return PushSummary.from_proto(msg)

    def close_epoch(
        self,
        epoch: int,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> EpochResult:
        """Flush this Monitor's pushes, then close the stream's epoch and
        return its metrics. The result includes every batch pushed through
        this Monitor before the call."""
        self._check_usable()
        epoch = check_epoch(epoch)
        split = check_name("split", split, 64)
        layer = check_name("layer", layer, 64)
        self.flush()
        req = pb.CloseEpochRequest(run_id=self._run_id, split=split, layer=layer, epoch=epoch)
        try:
            msg = self._unary(self._stub.CloseEpoch, req, what="CloseEpoch",
                              timeout=self._close_timeout)
        except VcidError as err:
            if err.code != "UNAVAILABLE":
                raise
            # The connection broke during the close: the daemon may or may
            # not have closed it. Ask again; if it did, read the result back.
            try:
                msg = self._unary(self._stub.CloseEpoch, req, what="CloseEpoch",
                                  timeout=self._close_timeout, retry=True)
            except VcidError as again:
                if again.code != "FAILED_PRECONDITION":
                    raise
                for r in self.history(split=split, layer=layer):
                    if r.epoch == epoch:
                        return r
                raise
        return EpochResult.from_proto(msg)

    def history(
        self,
        split: Optional[str] = DEFAULT_SPLIT,
        layer: Optional[str] = DEFAULT_LAYER,
    ) -> List[EpochResult]:
        """Closed epoch results of this run, ordered by split, layer, epoch.

        Filters default to ``split="train"``, ``layer="penultimate"`` like
        everywhere else; pass ``None`` to get every split / every layer.
        """
        self._check_usable()
        req = pb.GetHistoryRequest(
            run_id=self._run_id,
            split="" if split is None else check_name("split", split, 64),
            layer="" if layer is None else check_name("layer", layer, 64),
        )
        msg = self._unary(self._stub.GetHistory, req, what="GetHistory", retry=True)
        return [EpochResult.from_proto(r) for r in msg.results]

    def watch(
        self,
        split: Optional[str] = DEFAULT_SPLIT,
        layer: Optional[str] = DEFAULT_LAYER,
    ) -> Iterator[EpochResult]:
        """Yield every epoch result of this run as the daemon produces it
        (``None`` filters mean all). Stop by breaking out of the loop."""
        self._check_usable()
        req = pb.WatchRequest(
            run_id=self._run_id,
            split="" if split is None else check_name("split", split, 64),
            layer="" if layer is None else check_name("layer", layer, 64),
        )
        call = self._stub.Watch(req, metadata=self._call_md, wait_for_ready=True)
        try:
            for msg in call:
                yield EpochResult.from_proto(msg)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise VcidError.from_rpc_error(err, "Watch") from None
        finally:
            call.cancel()

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Flush, stop the sender thread and close the channel. Raises the
        pending ``VcidError`` if the daemon rejected something. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._stop.set()
            self._abort.set()
            self._thread.join(timeout=10)
            self._channel.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Do not hide the exception already on its way out.
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - reported, not swallowed silently
            log.error("vcid: while closing after %s: %s", exc_type.__name__, err)

    # --------------------------------------------------------------- helpers

    def _check_usable(self) -> None:
        if self._closed:
            raise VcidError("FAILED_PRECONDITION",
                            "monitor: expected an open Monitor, received a closed one")
        self._raise_pending()

    def _raise_pending(self) -> None:
        with self._state_lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def _unary(self, method: Any, request: Any, what: str, timeout: Optional[float] = None,
               retry: bool = False) -> Any:
        """One unary call; waits for the channel to be ready up to the
        deadline. With ``retry`` (idempotent calls only) an UNAVAILABLE
        failure is retried until ``reconnect_timeout``."""
        deadline = time.monotonic() + (self._reconnect_timeout if retry else 0)
        backoff = 0.05
        while True:
            try:
                return method(request, timeout=self._timeout if timeout is None else timeout,
                              metadata=self._call_md, wait_for_ready=True)
            except grpc.RpcError as err:
                if (retry and err.code() in _RETRYABLE and time.monotonic() < deadline
                        and not self._abort.is_set()):
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                raise VcidError.from_rpc_error(err, f"{what} to {self._address}") from None

    def _set_error(self, err: VcidError) -> None:
        with self._state_lock:
            if self._error is None:
                self._error = err
            else:
                # Keep the first error; mention the later one in its context.
                self._error.context += f"; later: {err}"

    # ---------------------------------------------------------- sender thread

    def _sender(self) -> None:
        backoff = 0.05
        down_since: Optional[float] = None
        while not self._abort.is_set():
            if not self._unacked:
                item = self._outbox.get(timeout=0.1)
                if item is None:
                    if self._stop.is_set():
                        return
                    continue
                if isinstance(item, _Flush):
                    # Nothing unconfirmed precedes it.
                    item.event.set()
                    continue
                self._outbox.push_front([item])
            stream = _Stream(self._unacked)
            self._unacked = []
            err = None
            summary = None
            try:
                call = self._stub.Push.future(self._requests(stream), metadata=self._call_md)
                stream.call = call
                summary = call.result()
            except grpc.RpcError as e:
                err = e
            except grpc.FutureCancelledError:
                err = None
            except Exception as e:  # noqa: BLE001 - a client bug: report it, don't hang
                err = _InternalFailure(e)
            with stream.lock:
                stream.closed = True
                sent = list(stream.sent)
                markers = list(stream.markers)
            if err is None and summary is not None:
                confirmed = PushSummary.from_proto(summary)
                with self._state_lock:
                    self._confirmed = self._confirmed + confirmed
                down_since = None
                backoff = 0.05
                handled = confirmed.batches_applied + confirmed.duplicates
                self._outbox.release(sent[:handled])
                if handled < len(sent):
                    # The daemon ended the stream before reading all of it
                    # (it takes batches in order): resend the rest.
                    self._unacked = sent[handled:]
                    self._outbox.push_front(markers)
                    continue
                for m in markers:
                    m.event.set()
                continue
            if err is None:  # cancelled during an abort
                for m in markers:
                    m.event.set()
                return
            code = err.code()
            now = time.monotonic()
            if code in _RETRYABLE and not self._abort.is_set():
                down_since = down_since if down_since is not None else now
                if now - down_since < self._reconnect_timeout:
                    # Nothing on the broken stream is confirmed: resend it
                    # all with the same keys; the daemon skips duplicates.
                    self._unacked = sent
                    self._outbox.push_front(markers)
                    with self._state_lock:
                        self._reconnects += 1
                    log.warning("vcid: Push stream to run %s broke (%s: %s); resending %d "
                                "batches", self._run_id, code.name, err.details(), len(sent))
                    self._abort.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                    try:
                        grpc.channel_ready_future(self._channel).result(timeout=1.0)
                    except grpc.FutureTimeoutError:
                        pass
                    continue
            dropped = sent + self._outbox.drain_batches()
            self._outbox.release(dropped)
            rows = sum(b.rows for b in dropped)
            what = ("gave up reconnecting after "
                    f"{self._reconnect_timeout:g}s; " if code in _RETRYABLE else "")
            context = (
                f"{what}Push stream of run {self._run_id!r}: {len(dropped)} batches "
                f"({rows} rows) held by this Monitor were not confirmed and are discarded"
                " (batches the daemon's message reports as applied stay applied)"
            )
            self._set_error(VcidError.from_rpc_error(err, context))
            down_since = None
            backoff = 0.05
            for m in markers:
                m.event.set()

    def _requests(self, stream: _Stream) -> Iterator[pb.FeatureBatch]:
        """The request iterator of one ``Push`` call (run by gRPC's thread)."""
        for b in stream.resend:
            yield b
        if len(stream.sent) >= self._rotate_batches or stream.bytes >= self._rotate_bytes:
            return
        last = time.monotonic()
        while True:
            call = stream.call
            if call is not None and call.done():
                return
            if self._abort.is_set():
                return
            item = self._outbox.get(timeout=0.05)
            if item is None:
                if self._stop.is_set():
                    return
                if stream.sent and time.monotonic() - last >= self._ack_interval:
                    return  # idle: end the stream so its batches get confirmed
                continue
            with stream.lock:
                if stream.closed:
                    self._outbox.push_front([item])
                    return
                if isinstance(item, _Flush):
                    stream.markers.append(item)
                    return
                stream.sent.append(item)
                stream.bytes += len(item.features)
            yield item
            last = time.monotonic()
            # End the stream at half the outbox bound, so its batches are
            # confirmed (and released) while callers fill the other half.
            if (len(stream.sent) >= self._rotate_batches
                    or stream.bytes >= self._rotate_bytes):
                return
