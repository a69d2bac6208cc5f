"""``Monitor``: one training process's connection to the vcid daemon.

Owns the public API of a run: run creation (``if_exists``), the epoch
numbering (``epoch=None`` continues after the last closed epoch, so a
re-run script appends), the checks of the caller's arguments, the encoding
of pushed batches into wire messages, and the unary calls (``CloseEpoch``,
``PushStats``, ``GetHistory``, ``GetRun``, ``Watch``) with the recovery of a
close whose connection broke. Finding and reaching the daemon is
``_connection``'s; delivery of pushed batches (outbox, sender thread,
``Push`` streams, resends) is the ``Sender``'s (``_sender``), whose deferred
errors the next call on the Monitor raises. Must not compute statistics
(``LocalAccumulator``) or validate arrays itself (``_arrays``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

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
from ._connection import CONNECT_TIMEOUT, Connection
from ._errors import ArgumentError, OpenEpochWarning, VcidError
from ._names import check_run_id, check_stream_filter, check_stream_name
from ._result import EpochResult, PushSummary, RunInfo
from ._sender import Sender
from .v1 import vcid_pb2 as pb

log = logging.getLogger("vcid")

DEFAULT_SPLIT = "train"
DEFAULT_LAYER = "penultimate"

#: What ``Monitor(if_exists=...)`` accepts.
IF_EXISTS = ("resume", "replace", "fail")

Stream = Tuple[str, str]  # (split, layer)


class Monitor:
    """A connection to a vcid daemon for one run.

    ``Monitor(run, num_classes, feature_dim)`` finds the daemon, creates the
    run (or resumes it, see ``if_exists``) and starts a background sender
    thread. Use it as a context manager, or call ``close()``: leaving the
    ``with`` block flushes every pushed batch, raises any error the daemon
    reported and warns (``OpenEpochWarning``) about epochs left open::

        with vcid.Monitor(run="resnet18-cifar10", num_classes=10,
                          feature_dim=512) as mon:
            for epoch in range(epochs):
                for x, y in loader:
                    mon.push(model.features(x), y)
                print(mon.close_epoch().vci)

    Epochs: ``push``, ``push_stats`` and ``close_epoch`` take ``epoch=None``
    (the default) to mean the stream's current epoch, ``current_epoch()``:
    it starts at ``start_epoch``, the first epoch after every epoch the run
    has closed, and moves on when that stream's epoch is closed. So running
    the same script again appends epochs to the run's history. An explicit
    epoch works too; one this Monitor knows to be closed is refused at once
    (``FAILED_PRECONDITION``, with a hint).

    Args:
        run: the run id (1-128 characters of ``[A-Za-z0-9_.:-]``).
        num_classes: K >= 2; labels must lie in ``[0, K)``.
        feature_dim: d >= 1, the number of feature columns.
        metadata: free-form string labels of the run (model, dataset, ...);
            kept as first given when the run already exists.
        address: ``host:port``, ``http://host:port`` or ``https://host:port`` of the daemon's gRPC
            listener. None (the default): ``$VCID_ADDR``, else
            ``127.0.0.1:50051``; when that is on this machine and nothing
            answers, a local daemon is started (data in ``$VCID_DATA_DIR``
            or ``~/.local/share/vcid``; it keeps running after the script,
            ``vcid stop`` ends it; ``VCID_AUTOSTART=0`` turns this off). An
            explicit address that does not answer within
            ``connect_timeout`` raises ``VcidError`` ``UNAVAILABLE``.
        if_exists: what to do when the run already exists: ``"resume"``
            (the default: keep its history and append epochs; its
            ``num_classes`` and ``feature_dim`` must match),
            ``"replace"`` (delete it, with its history, and start over) or
            ``"fail"`` (raise ``VcidError`` ``ALREADY_EXISTS``).
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
        connect_timeout: how long the first contact with the daemon may take.
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
        finish_on_exit: mark the run finished (``finish()``) on a clean
            ``close()`` or ``with`` exit; never after an exception.
        tls_ca, tls_client_cert, tls_client_key: PEM files for a daemon
            serving TLS (default: ``$VCID_TLS_CA``, ``$VCID_TLS_CLIENT_CERT``,
            ``$VCID_TLS_CLIENT_KEY``); an ``https://`` address alone uses
            gRPC's bundled CA roots.
    """

    def __init__(
        self,
        run: str,
        num_classes: int,
        feature_dim: int,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        address: Optional[str] = None,
        if_exists: str = "resume",
        encoding: str = "float32",
        token: Optional[str] = None,
        queue_size: int = 64,
        queue_bytes: int = 256 << 20,
        queue_timeout: Optional[float] = 60.0,
        timeout: float = 60.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        close_timeout: float = 600.0,
        reconnect_timeout: float = 60.0,
        ack_interval: float = 1.0,
        max_batch_bytes: int = 16 << 20,
        max_batch_rows: int = 65536,
        writer_id: Optional[str] = None,
        finish_on_exit: bool = False,
        tls_ca: Optional[str] = None,
        tls_client_cert: Optional[str] = None,
        tls_client_key: Optional[str] = None,
    ) -> None:
        self._closed = True  # until fully constructed, close() is a no-op
        self._run_id = check_run_id(run)
        num_classes, feature_dim = _check_shape_args(num_classes, feature_dim)
        if if_exists not in IF_EXISTS:
            raise ArgumentError("if_exists", f"expected one of {list(IF_EXISTS)}, "
                                             f"received {if_exists!r}")
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
        self._finish_on_exit = bool(finish_on_exit)
        self._close_timeout = float(close_timeout)
        self._reconnect_timeout = float(reconnect_timeout)
        self._queue_timeout = queue_timeout
        self._max_batch_bytes = int(max_batch_bytes)
        self._max_batch_rows = int(max_batch_rows)

        self._conn = Connection(address, token=token, timeout=timeout,
                                reconnect_timeout=reconnect_timeout,
                                connect_timeout=connect_timeout, tls_ca=tls_ca,
                                tls_client_cert=tls_client_cert,
                                tls_client_key=tls_client_key)
        try:
            run_msg = self._open_run(if_exists, num_classes, feature_dim, md)
            closed = (self._conn.history(self._run_id, "", "") if run_msg.closed_epochs
                      else [])
        except BaseException:
            self._conn.close()
            raise
        self._num_classes = run_msg.num_classes
        self._feature_dim = run_msg.feature_dim

        # Epoch bookkeeping, per (split, layer): epochs known closed, epochs
        # this Monitor pushed to and has not closed, the current epoch.
        self._epochs_lock = threading.Lock()
        self._closed_epochs: Dict[Stream, Set[int]] = {}
        for r in closed:
            self._closed_epochs.setdefault((r.split, r.layer), set()).add(r.epoch)
        self._start_epoch = 1 + max((r.epoch for r in closed), default=-1)
        self._current: Dict[Stream, int] = {}
        self._open: Dict[Stream, Set[int]] = {}
        self._warn_about_resumed_samples(run_msg)

        self._stats_lock = threading.RLock()
        self._stats_sequence = 0
        # PushStats blocks applied but not yet durable, with the daemon
        # incarnation that applied them (see ``_settle_stats``).
        self._stats_held: List[Tuple[pb.StatsBlock, int]] = []
        self._stats_bound = int(queue_size)
        self._sender = Sender(self._conn.channel, self._conn.metadata,
                              writer_id=self._writer_id, run_id=self._run_id,
                              address=self._conn.url, queue_size=queue_size,
                              queue_bytes=queue_bytes, reconnect_timeout=reconnect_timeout,
                              ack_interval=ack_interval,
                              others_held=lambda: bool(self._stats_held),
                              on_incarnation=self._resend_stale_stats)
        self._closed = False

    def _open_run(self, if_exists: str, num_classes: int, feature_dim: int,
                  metadata: Dict[str, str]) -> pb.Run:
        stub = self._conn.stub
        if if_exists == "replace":
            try:
                self._conn.unary(stub.DeleteRun, pb.DeleteRunRequest(run_id=self._run_id),
                                 what="DeleteRun")
            except VcidError as err:
                if err.code != "NOT_FOUND":
                    raise
        elif if_exists == "fail":
            try:
                existing = self._conn.unary(stub.GetRun, pb.GetRunRequest(run_id=self._run_id),
                                            what="GetRun")
            except VcidError as err:
                if err.code != "NOT_FOUND":
                    raise
            else:
                raise VcidError(
                    "ALREADY_EXISTS",
                    f"run: expected a new run (if_exists='fail'), received the existing run "
                    f"{self._run_id!r} ({existing.closed_epochs} closed epochs)",
                    "pass if_exists='resume' to append epochs to it, or if_exists='replace' "
                    "to delete it and start over",
                )
        try:
            return self._conn.unary(
                stub.CreateRun,
                pb.CreateRunRequest(run_id=self._run_id, num_classes=num_classes,
                                    feature_dim=feature_dim, metadata=metadata),
                what="CreateRun",
            )
        except VcidError as err:
            if err.code == "ALREADY_EXISTS":
                err.context += ("; the run exists with another shape: use another run name, "
                                "or if_exists='replace' to delete it and start over")
            raise

    def _warn_about_resumed_samples(self, run_msg: pb.Run) -> None:
        """The epoch a resumed run continues in may already hold samples:
        from another process of the same job, or left by an interrupted run
        of the script (which this Monitor would add to)."""
        held = [f"{o.split}/{o.layer}: {o.samples} samples" for o in run_msg.open_epochs
                if o.epoch == self._start_epoch and o.samples]
        if held:
            log.warning(
                "vcid: run %r continues at epoch %d, which already holds data pushed before "
                "this Monitor started (%s); pushes add to it. If that is left from an "
                "interrupted run, pass if_exists='replace' to start the run over",
                self._run_id, self._start_epoch, ", ".join(held))
        elif self._start_epoch:
            log.info("vcid: resuming run %r at epoch %d", self._run_id, self._start_epoch)

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
        """Batches pushed and not yet durable in the daemon (confirmed as
        applied or not): what this Monitor would resend after a crash."""
        return self._sender.pending

    @property
    def confirmed(self) -> PushSummary:
        """Totals the daemon confirmed for this Monitor's ``push`` batches."""
        return self._sender.confirmed

    @property
    def reconnects(self) -> int:
        """How many times the sender re-opened a broken ``Push`` stream."""
        return self._sender.reconnects

    @property
    def address(self) -> str:
        """The daemon's gRPC address, ``http://host:port``."""
        return self._conn.url

    @property
    def start_epoch(self) -> int:
        """The first epoch after every epoch the run had closed when this
        Monitor started (0 for a new run): where ``epoch=None`` begins."""
        return self._start_epoch

    def current_epoch(self, split: str = DEFAULT_SPLIT, layer: str = DEFAULT_LAYER) -> int:
        """The epoch ``epoch=None`` means for this stream now: ``start_epoch``
        until the stream closes an epoch, then the one after the last epoch
        it closed."""
        stream = (check_stream_name("split", split), check_stream_name("layer", layer))
        with self._epochs_lock:
            return self._current.get(stream, self._start_epoch)

    def run_info(self) -> RunInfo:
        """The run as the daemon knows it now (``GetRun``)."""
        self._check_usable()
        msg = self._conn.unary(self._conn.stub.GetRun, pb.GetRunRequest(run_id=self._run_id),
                               what="GetRun")
        return RunInfo.from_proto(msg)

    def finish(self) -> RunInfo:
        """Flush, then mark the run finished (``FinishRun``): the daemon keeps
        its history and series, refuses further pushes and the stall alert
        ignores it. Refused (``FAILED_PRECONDITION``) while an epoch is open."""
        self._check_usable()
        self.flush()
        msg = self._conn.unary(self._conn.stub.FinishRun,
                               pb.FinishRunRequest(run_id=self._run_id), what="FinishRun",
                               retry=True)
        return RunInfo.from_proto(msg)

    # ------------------------------------------------------------------ push

    def push(
        self,
        features: Any,
        labels: Any,
        epoch: Optional[int] = None,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> None:
        """Queue one batch: ``features`` (rows × feature_dim) with ``labels``.

        ``features`` may be a numpy array, anything with ``__array__`` or a
        tensor with ``.detach().cpu().numpy()`` (a torch bfloat16 tensor is
        sent bit for bit when ``encoding="bfloat16"``); ``labels`` any integer
        array of length rows with values in ``[0, num_classes)``. ``epoch``
        None means ``current_epoch(split, layer)``. Everything is checked
        here, before anything is sent (``vcid.ArgumentError``, a
        ``ValueError``). The call returns once the batch is encoded and
        queued; if the outbox stays full for ``queue_timeout`` seconds it
        raises ``QueueFullError`` and the batch is not queued.

        An error the daemon reported for earlier batches is raised after
        this call's batch is queued (the exception's ``context`` says so):
        do not push that batch again.
        """
        self._check_open()
        stream = (check_stream_name("split", split), check_stream_name("layer", layer))
        epoch = self._epoch_for(stream, epoch, "push")
        f = check_features(features, self._feature_dim)
        y = check_labels(labels, f.array.shape[0], self._num_classes)
        self._sender.submit(self._encode_batches(f, y, epoch, *stream), self._queue_timeout)
        with self._epochs_lock:
            self._open.setdefault(stream, set()).add(epoch)
        self._raise_pending("raised by push() after queueing its own batch, which is not "
                            "lost: do not push it again")

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
        self._sender.flush(self._conn.timeout if timeout is None else timeout)
        self._raise_pending()
        return self.confirmed

    # ----------------------------------------------------------- stats/close

    def push_stats(
        self,
        acc: Any,
        epoch: Optional[int] = None,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> PushSummary:
        """Send a ``LocalAccumulator`` or a ``vcid.torch.TorchAccumulator``
        (``PushStats``: its statistics, ``unit_within_trace`` included);
        merged exactly into the open epoch (``epoch`` None:
        ``current_epoch(split, layer)``). Retried safely (same idempotence
        key) while the daemon is unreachable, and kept until the daemon
        reports it durable: resent if the daemon restarts before that (at
        most ``queue_size`` blocks are held; beyond, this call asks the
        daemon for a checkpoint). Returns the daemon's summary
        of this one call."""
        self._check_usable()
        stream = (check_stream_name("split", split), check_stream_name("layer", layer))
        epoch = self._epoch_for(stream, epoch, "push_stats")
        if hasattr(acc, "to_local"):  # vcid.torch.TorchAccumulator: one copy to the host
            acc = acc.to_local()
        if not isinstance(acc, LocalAccumulator):
            raise ArgumentError("acc", f"expected a vcid.LocalAccumulator or "
                                       f"vcid.torch.TorchAccumulator, received "
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
            # A sequence space of its own: stats blocks are sent from the
            # caller's thread, concurrently with the batch stream.
            block = acc.to_proto(self._run_id, *stream, epoch,
                                 writer_id=self._stats_writer, sequence=seq)
            msg = self._send_stats(block)
            self._settle_stats(msg)
            if len(self._stats_held) >= self._stats_bound:
                self._settle_stats(self._stats_checkpoint(force=True))
        with self._epochs_lock:
            self._open.setdefault(stream, set()).add(epoch)
        return PushSummary.from_proto(msg)

    @property
    def _stats_writer(self) -> str:
        return self._writer_id + ".stats"

    def _send_stats(self, block: pb.StatsBlock) -> pb.PushSummary:
        msg = self._conn.unary(self._conn.stub.PushStats, block, what="PushStats", retry=True)
        self._stats_held.append((block, msg.incarnation))
        return msg

    def _stats_checkpoint(self, force: bool) -> pb.CheckpointReply:
        return self._conn.unary(
            self._conn.stub.Checkpoint,
            pb.CheckpointRequest(run_id=self._run_id, writer_id=self._stats_writer, force=force),
            what="Checkpoint", retry=True)

    def _resend_stale_stats(self, incarnation: int) -> None:
        """The sender saw the daemon's ``incarnation``: resend the held
        stats blocks an earlier daemon process applied (runs on the sender
        thread, so a restart is noticed while this Monitor is idle)."""
        with self._stats_lock:
            if any(inc not in (0, incarnation) for _, inc in self._stats_held):
                try:
                    self._settle_stats(pb.PushSummary(incarnation=incarnation))
                except VcidError as err:
                    log.warning("vcid: resending PushStats blocks failed: %s", err)

    def _settle_stats(self, reply: Any) -> None:
        """Forget the held stats blocks ``reply`` reports durable; resend
        those an earlier daemon process applied (it restarted), until every
        held block was applied by the current one. Under ``_stats_lock``."""
        while True:
            incarnation = reply.incarnation
            through = reply.durable_through if reply.HasField("durable_through") else None
            resend = [b for b, inc in self._stats_held if inc not in (0, incarnation)]
            self._stats_held = [
                (b, inc) for b, inc in self._stats_held
                if inc == incarnation and inc != 0
                and (through is None or b.sequence > through)
            ]
            if not resend:
                return
            log.warning("vcid: the daemon restarted; run %r resends %d PushStats blocks it had "
                        "applied but not yet made durable", self._run_id, len(resend))
            for block in resend:
                reply = self._send_stats(block)

    def close_epoch(
        self,
        epoch: Optional[int] = None,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> EpochResult:
        """Flush this Monitor's pushes, then close the stream's epoch
        (``epoch`` None: ``current_epoch(split, layer)``, which then moves to
        the next epoch) and return its metrics. The result includes every
        batch pushed through this Monitor before the call."""
        self._check_usable()
        stream = (check_stream_name("split", split), check_stream_name("layer", layer))
        epoch = self._epoch_for(stream, epoch, "close_epoch")
        self.flush()
        result = self._close_resending(stream, epoch)
        # The stored result holds every batch and block of the epoch.
        self._sender.release_epoch(stream[0], stream[1], epoch)
        with self._stats_lock:
            self._stats_held = [(b, inc) for b, inc in self._stats_held
                                if (b.split, b.layer, b.epoch) != (stream[0], stream[1], epoch)]
        with self._epochs_lock:
            self._closed_epochs.setdefault(stream, set()).add(epoch)
            self._open.get(stream, set()).discard(epoch)
            self._current[stream] = max(self._current.get(stream, self._start_epoch), epoch + 1)
        return result

    def _close(self, stream: Stream, epoch: int) -> EpochResult:
        split, layer = stream
        req = pb.CloseEpochRequest(run_id=self._run_id, split=split, layer=layer, epoch=epoch)
        close = self._conn.stub.CloseEpoch
        try:
            msg = self._conn.unary(close, req, what="CloseEpoch", timeout=self._close_timeout)
        except VcidError as err:
            if err.code != "UNAVAILABLE":
                raise
            # The connection broke during the close: the daemon may or may
            # not have closed it. Ask again; if it did, read the result back.
            try:
                msg = self._conn.unary(close, req, what="CloseEpoch",
                                       timeout=self._close_timeout, retry=True)
            except VcidError as again:
                if again.code != "FAILED_PRECONDITION":
                    raise
                for r in self._conn.history(self._run_id, split, layer):
                    if r.epoch == epoch:
                        return r
                raise
        return EpochResult.from_proto(msg)

    def _close_resending(self, stream: Stream, epoch: int) -> EpochResult:
        """``_close``; while the daemon answers DATA_LOSS because writers
        have not resent what died with an earlier daemon process, resend
        what this Monitor holds and retry, for up to ``reconnect_timeout``
        seconds (other writers resend when they notice the restart)."""
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.05
        while True:
            try:
                return self._close(stream, epoch)
            except VcidError as err:
                # Only that refusal waits for resends; an epoch lost for good
                # (an older daemon's DATA_LOSS) is raised at once.
                waits = err.code == "DATA_LOSS" and "to have resent them" in err.message
                if not waits or time.monotonic() > deadline:
                    raise
            self._resync()
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _resync(self) -> None:
        """Resend held batches and stats blocks if the daemon restarted
        since it applied them, and wait until they are confirmed."""
        self._sender.flush(self._conn.timeout, resync=True)
        self._raise_pending()
        with self._stats_lock:
            if self._stats_held:
                self._settle_stats(self._stats_checkpoint(force=False))

    def _epoch_for(self, stream: Stream, epoch: Optional[int], what: str) -> int:
        """``epoch``, or the stream's current epoch for None; an epoch known
        to be closed is refused here, with the way out."""
        with self._epochs_lock:
            current = self._current.get(stream, self._start_epoch)
            if epoch is None:
                return current
            epoch = check_epoch(epoch)
            if epoch not in self._closed_epochs.get(stream, ()):
                return epoch
        raise VcidError(
            "FAILED_PRECONDITION",
            f"epoch: expected an epoch not yet closed on {stream[0]}/{stream[1]} of run "
            f"{self._run_id!r}, received {epoch}, which is closed",
            f"{what}(..., epoch=None) continues at epoch {current} "
            f"(Monitor.current_epoch()); if_exists='replace' starts the run over",
        )

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
        return self._conn.history(self._run_id, check_stream_filter("split", split),
                                  check_stream_filter("layer", layer))

    def watch(
        self,
        split: Optional[str] = DEFAULT_SPLIT,
        layer: Optional[str] = DEFAULT_LAYER,
    ) -> Iterator[EpochResult]:
        """Yield every epoch result of this run as the daemon produces it
        (``None`` filters mean all). Stop by breaking out of the loop."""
        self._check_usable()
        return self._conn.watch(self._run_id, check_stream_filter("split", split),
                                check_stream_filter("layer", layer))

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Flush, stop the sender thread and close the channel. Raises the
        pending ``VcidError`` if the daemon rejected something; warns
        (``OpenEpochWarning``) naming the epochs this Monitor pushed to that
        are still open. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            if self._finish_on_exit:
                self.finish()
        finally:
            left = self._left_open()
            self._closed = True
            self._sender.close()
            self._conn.close()
            if left:
                warnings.warn(OpenEpochWarning(
                    f"vcid: run {self._run_id!r}: epochs left open: {', '.join(left)}. Their "
                    f"statistics stay in the daemon's memory until closed: call "
                    f"close_epoch() before leaving (a re-run resumes in the first of them and "
                    f"adds to it; if_exists='replace' starts over). Ignore this on ranks that "
                    f"leave the closing to another process."), stacklevel=3)

    def _left_open(self) -> List[str]:
        """The epochs this Monitor pushed to that the daemon still holds
        open (all of them when it cannot be asked)."""
        with self._epochs_lock:
            mine = {(split, layer, e) for (split, layer), epochs in self._open.items()
                    for e in epochs}
        if not mine:
            return []
        try:
            run = self._conn.unary(self._conn.stub.GetRun,
                                   pb.GetRunRequest(run_id=self._run_id), what="GetRun",
                                   timeout=min(self._conn.timeout, 5.0))
            mine &= {(o.split, o.layer, o.epoch) for o in run.open_epochs}
        except VcidError:
            pass
        return [f"{split}/{layer} epoch {e}" for split, layer, e in sorted(mine)]

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Do not hide the exception already on its way out, nor call a
        # failed run finished.
        self._finish_on_exit = False
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - reported, not swallowed silently
            log.error("vcid: while closing after %s: %s", exc_type.__name__, err)

    # --------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise VcidError("FAILED_PRECONDITION",
                            "monitor: expected an open Monitor, received a closed one")

    def _check_usable(self) -> None:
        self._check_open()
        self._raise_pending()

    def _raise_pending(self, note: str = "") -> None:
        err = self._sender.take_error()
        if err is not None:
            if note:
                err.context = f"{err.context}; {note}" if err.context else note
            raise err
