"""``Sender``: at-least-once, applied-once delivery of feature batches over
client-streaming ``Push`` calls, from one background thread, holding every
batch until the daemon says it is durable.

Owns the bounded outbox, the sequence numbers of one writer, the sender
thread, the ``Push`` streams it opens, its ``Checkpoint`` calls, reconnects
with safe resends, the running totals the daemon confirmed and the first
deferred error. Must not check or encode batches (``_arrays``), create runs
or make the Monitor's unary calls (``Monitor``).

Delivery model
--------------
``submit()`` stamps a group of batches with the writer's ``writer_id`` and
the next ``sequence`` numbers and puts them in a bounded outbox. The sender
thread drains the outbox into a single open ``Push`` stream. A stream is
ended (and its ``PushSummary`` awaited) when someone flushes, when the
outbox has been idle for ``ack_interval`` seconds, when it carries half of
the outbox bound, or when a caller waits for room. Its applied batches are
then *held* until the daemon reports them durable: ``PushSummary`` (and
``Checkpoint``) carry ``durable_through``, and a held batch with a sequence
at or below it, applied by the same daemon process (``incarnation``), is
forgotten. A held batch is also forgotten when the Monitor closes its epoch
(the stored result holds it). The bound (``queue_size`` batches,
``queue_bytes`` bytes) counts every batch until it is durable, so a slow or
unreachable daemon makes ``submit`` wait (then ``QueueFullError``) instead
of growing memory; while a caller waits and batches are held, the sender
asks the daemon for a checkpoint (``Checkpoint(force=True)``) rather than
waiting for its periodic one. If a stream breaks with ``UNAVAILABLE``
(daemon restarting or killed, connection lost), or a reply shows a new
``incarnation`` (the daemon restarted meanwhile), the sender resends every
batch it holds with its original ``(writer_id, sequence)``; the daemon's
duplicate filter, restored from its checkpoint, skips those it already
holds durably, so nothing is lost or counted twice. A daemon that reports
no incarnation (before durable acknowledgements existed) is taken to make
a batch durable when it applies it. Any other error (the daemon rejected a
batch) is kept as a ``VcidError`` for ``take_error``; the batches still
held at that moment are discarded, and the error's ``context`` says how
many.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import grpc

from ._connection import RETRYABLE, jittered
from ._errors import QueueFullError, VcidError
from ._result import PushSummary
from .v1 import vcid_pb2 as pb
from .v1 import vcid_pb2_grpc as pb_grpc

log = logging.getLogger("vcid")


class _Flush:
    """A marker in the outbox: set once every batch queued before it is
    confirmed. A ``probe`` first asks the daemon whether it restarted (and
    resends the held batches if so)."""

    __slots__ = ("event", "probe")

    def __init__(self, probe: bool = False) -> None:
        self.event = threading.Event()
        self.probe = probe


class _Outbox:
    """Bounded FIFO of batches (and flush markers) between callers and the
    sender thread.

    The bound counts every batch the sender holds, from ``put_all`` until
    the sender ``release``-s it (confirmed by the daemon, or discarded after
    an error): queued batches and batches sent but not yet confirmed alike.
    So memory stays bounded and a slow or unreachable daemon pushes back on
    ``submit()`` instead of piling up resend buffers. Markers are not counted.
    """

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._held = 0
        self._held_bytes = 0
        self.waiting = 0  # callers blocked in put_all

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
                self.waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self.waiting -= 1
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


class Sender:
    """Delivers one writer's feature batches to the daemon (see the module doc).

    Args:
        channel: the gRPC channel to the daemon (owned by the caller; used
            for ``Push`` calls and to wait for it to become ready again).
        metadata: call metadata of every ``Push`` (the bearer token), or None.
        writer_id: the idempotence key stamped on every batch.
        run_id, address: for messages only.
        queue_size, queue_bytes: the outbox bound (batches, feature bytes);
            each stream is ended and confirmed after half of it.
        reconnect_timeout: how long to keep reconnecting after the daemon
            became unreachable before giving up with ``UNAVAILABLE``.
        ack_interval: an idle stream is ended after this many seconds.
        others_held: returns whether the owner holds other non-durable
            writes (PushStats blocks), so the sender keeps polling the
            daemon for restarts while it holds nothing itself.
        on_incarnation: called with the daemon's incarnation after every
            reply, from the sender thread (the owner resends its own
            writes when it changed).
    """

    def __init__(self, channel: grpc.Channel, metadata: Optional[Sequence[Any]], *,
                 writer_id: str, run_id: str, address: str, queue_size: int,
                 queue_bytes: int, reconnect_timeout: float, ack_interval: float,
                 others_held: Optional[Callable[[], bool]] = None,
                 on_incarnation: Optional[Callable[[int], None]] = None) -> None:
        self._others_held = others_held
        self._on_incarnation = on_incarnation
        self._channel = channel
        self._address = address
        self._push = pb_grpc.VciMonitorStub(channel).Push
        self._call_md = metadata
        self._writer_id = writer_id
        self._run_id = run_id
        self._reconnect_timeout = float(reconnect_timeout)
        self._ack_interval = float(ack_interval)
        self._outbox = _Outbox(int(queue_size), int(queue_bytes))
        self._rotate_batches = max(1, int(queue_size) // 2)
        self._rotate_bytes = max(1, int(queue_bytes) // 2)
        self._submit_lock = threading.Lock()
        self._sequence = 0
        self._state_lock = threading.Lock()
        self._error: Optional[VcidError] = None
        self._confirmed = PushSummary()
        self._reconnects = 0
        self._unacked: List[pb.FeatureBatch] = []
        # Applied but not yet durable: (batch, incarnation that applied it).
        self._held: List[Tuple[pb.FeatureBatch, int]] = []
        self._checkpoint = pb_grpc.VciMonitorStub(channel).Checkpoint
        self._last_query = 0.0
        self._stop = threading.Event()  # finish what is queued, then exit
        self._abort = threading.Event()  # exit now
        self._thread = threading.Thread(target=self._run, name=f"vcid-sender-{run_id}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ interface

    @property
    def pending(self) -> int:
        """Batches submitted and not yet durable in the daemon."""
        return self._outbox.held

    @property
    def confirmed(self) -> PushSummary:
        """Totals the daemon confirmed for the submitted batches."""
        with self._state_lock:
            return self._confirmed

    @property
    def reconnects(self) -> int:
        """How many times a broken ``Push`` stream was re-opened."""
        with self._state_lock:
            return self._reconnects

    def submit(self, batches: List[pb.FeatureBatch], timeout: Optional[float]) -> None:
        """Stamp ``batches`` with consecutive sequence numbers and queue them
        together; ``QueueFullError`` (nothing queued) when the outbox stays
        full for ``timeout`` seconds (None: wait forever). The lock keeps
        queue order equal to sequence order."""
        with self._submit_lock:
            first = self._sequence + 1
            for i, b in enumerate(batches):
                b.writer_id = self._writer_id
                b.sequence = first + i
            if not self._outbox.put_all(batches, timeout):
                raise QueueFullError(
                    f"push: expected room in the outbox within queue_timeout={timeout}s, "
                    f"received none: {self.pending} batches are waiting for the daemon "
                    f"(queue_size/queue_bytes reached); the batch was not queued"
                )
            self._sequence = first + len(batches) - 1

    def flush(self, timeout: float, resync: bool = False) -> None:
        """Wait until every batch submitted so far is confirmed (or
        discarded after an error, see ``take_error``); ends the current
        stream. With ``resync``, first ask the daemon whether it restarted
        since it applied the held batches, and resend them if so.
        ``VcidError`` ``DEADLINE_EXCEEDED`` after ``timeout`` s."""
        marker = _Flush(probe=resync)
        self._outbox.put_marker(marker)
        if not marker.event.wait(timeout):
            raise VcidError(
                "DEADLINE_EXCEEDED",
                f"flush: expected the daemon to confirm the pushed batches within {timeout}s, "
                f"received no confirmation ({self.pending} batches still held)",
            )

    def release_epoch(self, split: str, layer: str, epoch: int) -> None:
        """Forget the held batches of an epoch whose result is now stored
        (it holds them; nothing of it can be resent any more)."""
        with self._state_lock:
            done = [b for b, _ in self._held
                    if (b.split, b.layer, b.epoch) == (split, layer, epoch)]
            self._held = [(b, i) for b, i in self._held
                          if (b.split, b.layer, b.epoch) != (split, layer, epoch)]
        self._outbox.release(done)

    def take_error(self) -> Optional[VcidError]:
        """The first error since the last call (None if none), cleared."""
        with self._state_lock:
            err, self._error = self._error, None
        return err

    def close(self) -> None:
        """Stop the thread now (flush first to deliver what is queued)."""
        self._stop.set()
        self._abort.set()
        self._thread.join(timeout=10)

    # --------------------------------------------------------- sender thread

    def _set_error(self, err: VcidError) -> None:
        with self._state_lock:
            if self._error is None:
                self._error = err
            else:
                # Keep the first error; mention the later one in its context.
                self._error.context += f"; later: {err}"

    def _hold(self, batches: Sequence[pb.FeatureBatch], reply: Any) -> None:
        """``batches`` were applied by the daemon that sent ``reply``."""
        with self._state_lock:
            self._held.extend((b, reply.incarnation) for b in batches)
        self._settle(reply)

    def _settle(self, reply: Any) -> None:
        """Apply a reply's durable acknowledgement: release the held batches
        it covers; queue for resending those applied by an earlier daemon
        process."""
        incarnation = reply.incarnation
        through = reply.durable_through if reply.HasField("durable_through") else None
        durable, resend = [], []
        with self._state_lock:
            keep = []
            for b, inc in self._held:
                if inc == 0 or (inc == incarnation and through is not None
                                and b.sequence <= through):
                    durable.append(b)  # inc 0: a daemon that acknowledges on apply
                elif inc != incarnation:
                    resend.append(b)
                else:
                    keep.append((b, inc))
            self._held = keep
        self._outbox.release(durable)
        if self._on_incarnation is not None and incarnation:
            try:
                self._on_incarnation(incarnation)
            except Exception as e:  # noqa: BLE001 - the owner's bug must not stop delivery
                log.warning("vcid: resending after a daemon restart failed: %r", e)
        if resend:
            log.warning("vcid: the daemon at %s restarted; run %s resends %d batches it had "
                        "applied but not yet made durable", self._address, self._run_id,
                        len(resend))
            self._requeue(resend)

    def _take_held(self) -> List[pb.FeatureBatch]:
        with self._state_lock:
            held, self._held = [b for b, _ in self._held], []
        return held

    def _requeue(self, batches: List[pb.FeatureBatch]) -> None:
        """Send ``batches`` (still counted in the outbox) before anything new."""
        self._unacked = sorted(batches + self._unacked, key=lambda b: b.sequence)

    def _query(self, force: bool) -> bool:
        """One ``Checkpoint`` call; False when the daemon did not answer."""
        self._last_query = time.monotonic()
        req = pb.CheckpointRequest(run_id=self._run_id, writer_id=self._writer_id, force=force)
        try:
            reply = self._checkpoint(req, metadata=self._call_md,
                                     timeout=max(self._reconnect_timeout, 1.0))
        except grpc.RpcError as e:
            log.debug("vcid: Checkpoint call failed: %s", e)
            return False
        self._settle(reply)
        return True

    def _maybe_query(self) -> None:
        """While batches are held: ask for a checkpoint when a caller waits
        for room, else poll the durable
        acknowledgement every ``ack_interval`` seconds."""
        with self._state_lock:
            held = len(self._held)
        if not held and not (self._others_held is not None and self._others_held()):
            return
        since = time.monotonic() - self._last_query
        if self._outbox.waiting:
            if since >= 0.2:
                self._query(force=True)
        elif since >= self._ack_interval:
            self._query(force=False)

    def _run(self) -> None:
        backoff = 0.05
        down_since: Optional[float] = None
        attempts = 0  # failed attempts in the current outage
        while not self._abort.is_set():
            if not self._unacked:
                self._maybe_query()
            if not self._unacked:
                item = self._outbox.get(timeout=0.1)
                if item is None:
                    if self._stop.is_set():
                        return
                    continue
                if isinstance(item, _Flush):
                    if item.probe:
                        item.probe = False
                        self._query(force=False)
                        if self._unacked:  # the daemon restarted: resend first
                            self._outbox.push_front([item])
                            continue
                    # Nothing unconfirmed precedes it.
                    item.event.set()
                    continue
                self._outbox.push_front([item])
            stream = _Stream(self._unacked)
            self._unacked = []
            err = None
            summary = None
            try:
                call = self._push.future(self._requests(stream), metadata=self._call_md)
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
                if down_since is not None:
                    log.warning("vcid: reconnected to %s after %.1fs (%d attempts); run %s "
                                "resent its unconfirmed batches (the daemon skips those it "
                                "had applied)", self._address, time.monotonic() - down_since,
                                attempts, self._run_id)
                down_since = None
                attempts = 0
                backoff = 0.05
                handled = confirmed.batches_applied + confirmed.duplicates
                self._hold(sent[:handled], summary)
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
            if code in RETRYABLE and not self._abort.is_set():
                if down_since is None:
                    down_since = now
                    # One line when the outage begins, one when it ends.
                    log.warning("vcid: lost the connection to %s (%s: %s); run %s holds %d "
                                "unconfirmed batches and keeps reconnecting for up to %gs",
                                self._address, code.name, err.details(), self._run_id,
                                self._outbox.held, self._reconnect_timeout)
                attempts += 1
                if now - down_since < self._reconnect_timeout:
                    # Nothing on the broken stream is confirmed, and the
                    # daemon may have restarted: resend it and every held
                    # batch with the same keys; the daemon skips duplicates.
                    self._unacked = []
                    self._requeue(self._take_held() + sent)
                    self._outbox.push_front(markers)
                    with self._state_lock:
                        self._reconnects += 1
                    self._abort.wait(jittered(backoff))
                    backoff = min(backoff * 2, 2.0)
                    try:
                        grpc.channel_ready_future(self._channel).result(timeout=1.0)
                    except grpc.FutureTimeoutError:
                        pass
                    continue
            dropped = self._take_held() + sent + self._outbox.drain_batches()
            self._outbox.release(dropped)
            rows = sum(b.rows for b in dropped)
            what = (f"gave up reconnecting after {self._reconnect_timeout:g}s "
                    f"({attempts} attempts); " if code in RETRYABLE else "")
            context = (
                f"{what}Push stream of run {self._run_id!r}: {len(dropped)} batches "
                f"({rows} rows) held by this Monitor were not confirmed and are discarded"
                " (batches the daemon's message reports as applied stay applied)"
            )
            self._set_error(VcidError.from_rpc_error(err, context))
            down_since = None
            attempts = 0
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
                if stream.sent and (self._outbox.waiting
                                    or time.monotonic() - last >= self._ack_interval):
                    return  # idle or a caller waits: end the stream to confirm it
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
