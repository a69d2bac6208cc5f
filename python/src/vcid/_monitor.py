"""``Monitor``: one training process's connection to the vcid daemon.

Owns the public API of a run: the channel, run creation, the checks of the
caller's arguments, the encoding of pushed batches into wire messages, and
the unary calls (``CloseEpoch``, ``PushStats``, ``GetHistory``, ``GetRun``,
``Watch``) with their retries and the recovery of a close whose connection
broke. Delivery of pushed batches (outbox, sender thread, ``Push`` streams,
resends) is the ``Sender``'s (``_sender``); errors it defers are raised by
the next call on the Monitor. Must not compute statistics
(``LocalAccumulator``) or validate arrays itself (``_arrays``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional

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
    encode,
    feature_rows_per_message,
)
from ._errors import ArgumentError, VcidError
from ._names import check_run_id, check_stream_filter, check_stream_name
from ._result import EpochResult, PushSummary, RunInfo
from ._sender import RETRYABLE, Sender
from .v1 import vcid_pb2 as pb
from .v1 import vcid_pb2_grpc as pb_grpc

log = logging.getLogger("vcid")

DEFAULT_SPLIT = "train"
DEFAULT_LAYER = "penultimate"

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
        self._run_id = check_run_id(run)
        num_classes, feature_dim = _check_shape_args(num_classes, feature_dim)
        if not isinstance(address, str) or not address:
            raise ArgumentError("address", f"expected 'host:port', received {address!r}")
        self._encoding = check_encoding(encoding)
        self._enum, self._width = ENCODINGS[encoding]
        md: Dict[str, str] = {}
        for key, value in (metadata or {}).items():
            if not isinstance(key, str):
                raise ArgumentError(
                    "metadata", f"expected string keys, received {type(key).__name__} {key!r}"
                )
            md[key] = value if isinstance(value, str) else str(value)
        if queue_size < 1:
            raise ArgumentError("queue_size", f"expected at least 1, received {queue_size}")
        self._writer_id = writer_id if writer_id is not None else uuid.uuid4().hex
        self._timeout = float(timeout)
        self._close_timeout = float(close_timeout)
        self._queue_timeout = queue_timeout
        self._reconnect_timeout = float(reconnect_timeout)
        self._max_batch_bytes = int(max_batch_bytes)
        self._max_batch_rows = int(max_batch_rows)
        self._call_md = [("authorization", f"Bearer {token}")] if token else None
        self._address = address
        self._closing = threading.Event()  # ends the retries of unary calls

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

        self._stats_lock = threading.Lock()
        self._stats_sequence = 0
        self._sender = Sender(self._channel, self._call_md, writer_id=self._writer_id,
                              run_id=self._run_id, queue_size=queue_size,
                              queue_bytes=queue_bytes, reconnect_timeout=reconnect_timeout,
                              ack_interval=ack_interval)
        self._closed = False

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
        return self._sender.pending

    @property
    def confirmed(self) -> PushSummary:
        """Totals the daemon confirmed for this Monitor's ``push`` batches."""
        return self._sender.confirmed

    @property
    def reconnects(self) -> int:
        """How many times the sender re-opened a broken ``Push`` stream."""
        return self._sender.reconnects

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
        is checked here, before anything is sent (``vcid.ArgumentError``, a
        ``ValueError``). The call returns once the batch is encoded and
        queued; if the outbox stays full for ``queue_timeout`` seconds it
        raises ``QueueFullError`` and the batch is not queued. Raises
        ``VcidError`` for an earlier failure the daemon reported.
        """
        self._check_usable()
        epoch = check_epoch(epoch)
        split = check_stream_name("split", split)
        layer = check_stream_name("layer", layer)
        f = check_features(features, self._feature_dim)
        rows = f.array.shape[0]
        y = check_labels(labels, rows, self._num_classes)
        self._sender.submit(self._encode_batches(f, y, epoch, split, layer),
                            self._queue_timeout)

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

    def _enqueue_batch_unchecked(self, batch: pb.FeatureBatch) -> None:
        """Queue a raw wire batch with no local checks (tests use it to make
        the daemon reject something)."""
        self._check_usable()
        self._sender.submit([batch], self._queue_timeout)

    def flush(self, timeout: Optional[float] = None) -> PushSummary:
        """Wait until every batch pushed so far is confirmed by the daemon.

        Ends the current ``Push`` stream and waits for its summary. Returns
        the running totals of this Monitor (``confirmed``); raises
        ``VcidError`` if the daemon rejected something.
        """
        self._check_usable()
        self._sender.flush(self._timeout if timeout is None else timeout)
        self._raise_pending()
        return self.confirmed

    # ----------------------------------------------------------- stats/close

    def push_stats(
        self,
        acc: LocalAccumulator,
        epoch: int,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> PushSummary:
        """Send a ``LocalAccumulator`` (``PushStats``: its §2.1 statistics and
        its ``unit_within_trace``); merged exactly into the open epoch.
        Retried safely (same idempotence key) while the daemon is
        unreachable. Returns the daemon's summary of this one call."""
        self._check_usable()
        epoch = check_epoch(epoch)
        split = check_stream_name("split", split)
        layer = check_stream_name("layer", layer)
        if not isinstance(acc, LocalAccumulator):
            raise ArgumentError("acc", f"expected a vcid.LocalAccumulator, received "
                             f"{type(acc).__name__}")
        if (acc.num_classes, acc.feature_dim) != (self._num_classes, self._feature_dim):
            raise ArgumentError(
                "acc", f"expected num_classes={self._num_classes}, feature_dim="
                f"{self._feature_dim} (the run's), received num_classes={acc.num_classes}, "
                f"feature_dim={acc.feature_dim}"
            )
        if acc.samples == 0:
            raise ArgumentError("acc", "expected at least 1 sample, received an empty accumulator")
        with self._stats_lock:
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
        split = check_stream_name("split", split)
        layer = check_stream_name("layer", layer)
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
            split=check_stream_filter("split", split),
            layer=check_stream_filter("layer", layer),
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
            split=check_stream_filter("split", split),
            layer=check_stream_filter("layer", layer),
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
            self._closing.set()
            self._sender.close()
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
        err = self._sender.take_error()
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
                if (retry and err.code() in RETRYABLE and time.monotonic() < deadline
                        and not self._closing.is_set()):
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                raise VcidError.from_rpc_error(err, f"{what} to {self._address}") from None
