"""The client against the real daemon (``vcid serve`` on ephemeral loopback
ports, a temporary data directory, real gRPC): results against the numpy
reference, inputs, history, push_stats, errors, and delivery (backpressure,
reconnects, resends)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

import vcid
from vcid.v1 import vcid_pb2 as pb

import reference as ref
from proxy import CuttableProxy
from test_local import BAD_INPUTS, ArrayLike, FakeTensor

METRICS = ("vci", "linear_probe_mse", "nc1", "cdnv", "class_separation", "equinorm",
           "equiangularity", "effective_rank")


def assert_matches_reference(result: vcid.EpochResult, x_wire: np.ndarray, y: np.ndarray,
                             k: int, rel: float = 1e-8) -> None:
    """``x_wire``: the float64 values the daemon decoded (after the encoding)."""
    want = ref.metrics(x_wire, y, k)
    assert result.samples == want["samples"]
    assert result.classes_observed == want["classes_observed"]
    assert result.feature_dim == want["feature_dim"]
    assert result.rank_total == want["rank_total"]
    assert result.rank_between == want["rank_between"]
    assert result.small_sample == want["small_sample"]
    for name in METRICS:
        got = getattr(result, name)
        assert got is not None, f"{name} undefined: {result.notes}"
        assert got == pytest.approx(want[name], rel=rel, abs=1e-12), name


def push_in_uneven_batches(mon, x, y, epoch, split="train", rng=None):
    rng = rng or np.random.default_rng(0)
    start = 0
    while start < len(y):
        size = int(rng.integers(1, 97))
        mon.push(x[start:start + size], y[start:start + size], epoch=epoch, split=split)
        start += size


# ------------------------------------------------------------ correctness


@pytest.mark.parametrize("encoding", ["float32", "float16", "bfloat16"])
def test_results_equal_the_numpy_reference(daemon, run_id, encoding):
    rng = np.random.default_rng(7)
    k, d = 5, 16
    x, y = ref.clustered(rng, 700, d, k, offset=3.0)
    with vcid.Monitor(run_id, num_classes=k, feature_dim=d,
                      metadata={"model": "test", "dataset": "synthetic"},
                      encoding=encoding, address=daemon.address) as mon:
        push_in_uneven_batches(mon, x, y, epoch=0, rng=rng)
        result = mon.close_epoch(0)
    assert (result.run_id, result.split, result.layer, result.epoch) == (
        run_id, "train", "penultimate", 0)
    if encoding == "bfloat16":
        # Independent rounding (nearest of two neighbours), not the package's.
        x_wire = ref.bfloat16_values(ref.bfloat16_round(x.astype(np.float32)))
    else:
        x_wire = x.astype(np.float32 if encoding == "float32" else np.float16).astype(np.float64)
    assert not np.array_equal(x_wire, x)  # the rounding matters for the comparison
    assert_matches_reference(result, x_wire, y, k)
    assert result.vci_delta is None  # first epoch of the stream
    assert result.close_seconds >= 0 and result.closed_unix_ms > 0
    assert set(result.notes) == {"vci_delta"}  # only the delta is undefined


def test_tensor_like_inputs(daemon, run_id):
    rng = np.random.default_rng(11)
    k, d = 4, 6
    x, y = ref.clustered(rng, 240, d, k)
    x32 = x.astype(np.float32)
    inputs = {
        "numpy": lambda a, b: (a, b),
        "array-like": lambda a, b: (ArrayLike(a), ArrayLike(b)),
        "tensor-like": lambda a, b: (FakeTensor(a), FakeTensor(b.astype(np.int32))),
        "lists": lambda a, b: (a.tolist(), b.tolist()),
    }
    results = {}
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        for split, convert in zip(["numpy", "arraylike", "tensorlike", "lists"],
                                  inputs.values()):
            for start in range(0, 240, 60):
                fx, fy = convert(x32[start:start + 60], y[start:start + 60])
                mon.push(fx, fy, epoch=0, split=split)
            results[split] = mon.close_epoch(0, split=split)
    assert_matches_reference(results["numpy"], x32.astype(np.float64), y, k)
    for split in ("arraylike", "tensorlike", "lists"):
        for name in METRICS:
            assert getattr(results[split], name) == getattr(results["numpy"], name), (split, name)


def test_history_and_vci_delta(daemon, run_id):
    rng = np.random.default_rng(5)
    k, d = 3, 5
    closed = []
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        for epoch in range(3):
            # Shrinking spread: VCI falls from epoch to epoch.
            x, y = ref.clustered(rng, 150, d, k, spread=1.0 / (epoch + 1))
            mon.push(x, y, epoch=epoch)
            mon.push(x[:60], y[:60], epoch=epoch, split="val")
            closed.append(mon.close_epoch(epoch))
        val = mon.close_epoch(0, split="val")
        train = mon.history()
        only_val = mon.history(split="val")
        everything = mon.history(split=None, layer=None)
        other_layer = mon.history(layer="logits")
    assert train == closed
    assert [r.epoch for r in train] == [0, 1, 2]
    assert train[0].vci_delta is None
    for prev, cur in zip(train, train[1:]):
        assert cur.vci_delta == pytest.approx(cur.vci - prev.vci, abs=1e-12)
    assert only_val == [val]
    assert sorted((r.split, r.epoch) for r in everything) == [
        ("train", 0), ("train", 1), ("train", 2), ("val", 0)]
    assert other_layer == []


def test_watch_sees_closed_epochs(daemon, run_id):
    rng = np.random.default_rng(9)
    x, y = ref.clustered(rng, 50, 4, 2)
    seen = []
    with vcid.Monitor(run_id, 2, 4, address=daemon.address) as mon:
        watcher = mon.watch(split=None)
        ready = threading.Event()

        def consume():
            ready.set()
            for result in watcher:
                seen.append(result)
                if len(seen) == 2:
                    break

        t = threading.Thread(target=consume)
        t.start()
        ready.wait()
        time.sleep(0.3)  # let the subscription reach the daemon
        mon.push(x, y, epoch=0)
        mon.push(x, y, epoch=0, split="val")
        a = mon.close_epoch(0)
        b = mon.close_epoch(0, split="val")
        t.join(timeout=20)
    assert seen == [a, b]


# ------------------------------------------------------------ push_stats


def test_push_stats_equals_raw_push_and_merge_equals_whole(daemon, run_id):
    rng = np.random.default_rng(21)
    k, d = 4, 10
    x, y = ref.clustered(rng, 900, d, k, offset=10.0)
    x32 = x.astype(np.float32).astype(np.float64)  # what a float32 push delivers
    whole = vcid.LocalAccumulator(k, d)
    ranks = [vcid.LocalAccumulator(k, d) for _ in range(3)]
    for i, start in enumerate(range(0, 900, 50)):
        whole.update(x32[start:start + 50], y[start:start + 50])
        ranks[i % 3].update(x32[start:start + 50], y[start:start + 50])
    merged = vcid.LocalAccumulator(k, d)
    for r in ranks:
        merged.merge(r)
    for name in ("class_counts", "class_means", "scatter", "within_trace", "unit_sum",
                 "unit_count", "unit_within_trace"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name),
                                   rtol=1e-10, atol=1e-8, err_msg=name)
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        summary = mon.push_stats(merged, epoch=0, split="stats")
        assert summary.rows_applied == 900 and summary.duplicates == 0
        # Two halves pushed as stats into one epoch merge exactly as well.
        mon.push_stats(ranks[0], epoch=0, split="halves")
        mon.push_stats(ranks[1].copy().merge(ranks[2]), epoch=0, split="halves")
        push_in_uneven_batches(mon, x, y, epoch=0, split="raw")
        via_stats = mon.close_epoch(0, split="stats")
        via_halves = mon.close_epoch(0, split="halves")
        via_raw = mon.close_epoch(0, split="raw")
    assert_matches_reference(via_stats, x32, y, k)
    for name in METRICS:
        assert getattr(via_stats, name) == pytest.approx(getattr(via_raw, name), rel=1e-9)
        assert getattr(via_halves, name) == pytest.approx(getattr(via_raw, name), rel=1e-9)


def test_class_separation_with_a_large_common_offset(daemon, run_id):
    """Features 1e4 + 1e-2·(centre + noise): every direction lies within ~1e-6
    of the others. class_separation from raw pushes and from push_stats must
    match the pairwise-cosine reference (on the normalised rows themselves) to
    1e-9; from the unit sums alone (a StatsBlock without unit_within_trace,
    which the daemon then derives as c − ‖Σu‖²/c) it cannot."""
    rng = np.random.default_rng(5)
    k, d, n = 4, 8, 800
    y = rng.integers(0, k, size=n)
    centres = rng.normal(size=(k, d)) * 3.0
    x = 1e4 + 1e-2 * (centres[y] + rng.normal(size=(n, d)))
    x32 = x.astype(np.float32).astype(np.float64)  # what a float32 push delivers
    want = ref.class_separation(x32, y)
    assert 0.1 < want < 0.99  # a separation the test can get wrong
    acc = vcid.LocalAccumulator(k, d)
    for start in range(0, n, 64):
        acc.update(x32[start:start + 64], y[start:start + 64])
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        push_in_uneven_batches(mon, x, y, epoch=0, split="raw", rng=rng)
        mon.push_stats(acc, epoch=0, split="stats")
        without = acc.to_proto(run_id, "sums-only", "penultimate", 0)
        without.ClearField("unit_within_trace")
        mon._conn.stub.PushStats(without, timeout=30)
        via_raw = mon.close_epoch(0, split="raw")
        via_stats = mon.close_epoch(0, split="stats")
        via_sums = mon.close_epoch(0, split="sums-only")
    assert via_raw.class_separation == pytest.approx(want, rel=1e-9, abs=0)
    assert via_stats.class_separation == pytest.approx(want, rel=1e-9, abs=0)
    assert abs(via_sums.class_separation / want - 1) > 1e-7  # ~2e-6 here


def test_daemon_rejects_an_invalid_unit_within_trace(daemon, run_id):
    """Forced past local validation (raw stub): the daemon names the field and
    changes nothing."""
    x, y = np.array([[3.0, 4.0], [4.0, 3.0], [0.0, 1.0]]), np.array([0, 0, 1])
    acc = vcid.LocalAccumulator(2, 2).update(x, y)
    with vcid.Monitor(run_id, 2, 2, address=daemon.address) as mon:
        for bad in ([0.04, -0.5], [3.0, 0.0], [0.04]):
            block = acc.to_proto(run_id, "train", "penultimate", 0)
            del block.unit_within_trace[:]
            block.unit_within_trace.extend(bad)
            with pytest.raises(grpc.RpcError) as info:
                mon._conn.stub.PushStats(block, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unit_within_trace" in info.value.details(), info.value.details()
        assert mon.run_info().rows_ingested == 0
        mon.push_stats(acc, epoch=0)
        assert mon.run_info().rows_ingested == 3


def test_push_stats_checks_its_argument(daemon, run_id):
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        with pytest.raises(ValueError, match=r"acc: expected num_classes=3, feature_dim=4 "
                                             r"\(the run's\), received num_classes=3, "
                                             r"feature_dim=5"):
            mon.push_stats(vcid.LocalAccumulator(3, 5), epoch=0)
        with pytest.raises(ValueError, match="acc: expected at least 1 sample"):
            mon.push_stats(vcid.LocalAccumulator(3, 4), epoch=0)
        assert mon.run_info().rows_ingested == 0


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("case,features,labels,message", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_push_validates_locally_before_sending(daemon, run_id, case, features, labels,
                                               message):
    with vcid.Monitor(run_id, num_classes=3, feature_dim=4, address=daemon.address) as mon:
        with pytest.raises(ValueError, match=message):
            mon.push(features, labels, epoch=0)
        assert mon.flush() == vcid.PushSummary()
        info = mon.run_info()
    assert info.rows_ingested == 0 and info.open_epochs == []


def test_push_checks_names_epoch_and_constructor_arguments(daemon, run_id):
    x, y = np.ones((2, 4)), np.array([0, 1])
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        with pytest.raises(ValueError, match=r"split: expected 1-64 characters of "
                                             r"\[A-Za-z0-9_.:-\], received 'no spaces'"):
            mon.push(x, y, epoch=0, split="no spaces")
        with pytest.raises(ValueError, match=r"layer: expected 1-64 characters .* received ''"):
            mon.push(x, y, epoch=0, layer="")
        with pytest.raises(ValueError, match=r"epoch: expected a non-negative integer below "
                                             r"2\*\*64, received -1"):
            mon.push(x, y, epoch=-1)
        with pytest.raises(ValueError, match=r"epoch: expected a non-negative integer, "
                                             r"received float 1.5"):
            mon.push(x, y, epoch=1.5)
        assert mon.run_info().rows_ingested == 0
    with pytest.raises(ValueError, match=r"encoding: expected one of \['bfloat16', 'float16', "
                                         r"'float32'\], received 'int8'"):
        vcid.Monitor(run_id, 3, 4, encoding="int8", address=daemon.address)
    with pytest.raises(ValueError, match=r"run: expected 1-128 characters .* received 'a/b'"):
        vcid.Monitor("a/b", 3, 4, address=daemon.address)
    with pytest.raises(ValueError, match=r"num_classes: expected an integer in \[2, 2\*\*32\), "
                                         r"received 1"):
        vcid.Monitor(run_id, 1, 4, address=daemon.address)


def _bad_label_batch(run_id: str, label: int) -> pb.FeatureBatch:
    return pb.FeatureBatch(run_id=run_id, epoch=0, rows=2,
                           features=np.zeros((2, 4), "<f4").tobytes(), labels=[1, label])


def test_server_rejection_raises_vcid_error_naming_the_label(daemon, run_id):
    good_x, good_y = np.arange(12.0).reshape(3, 4), np.array([0, 1, 2])
    with vcid.Monitor(run_id, num_classes=3, feature_dim=4, address=daemon.address) as mon:
        mon.push(good_x, good_y, epoch=0)
        # Forced past local validation: label 7 >= K = 3.
        mon._enqueue_batch_unchecked(_bad_label_batch(run_id, 7))
        with pytest.raises(vcid.VcidError) as info:
            mon.flush()
        err = info.value
        assert err.code == "INVALID_ARGUMENT"
        assert "label" in err.message and "7" in err.message, err.message
        assert "discarded" in err.context
        # Raised once; the Monitor keeps working, and the batch before the
        # rejected one stayed applied (a batch is applied whole or not at all).
        mon.push(good_x, good_y, epoch=0)
        result = mon.close_epoch(0)
    assert result.samples == 6


def test_server_error_surfaces_at_the_next_push_and_at_exit(daemon, run_id):
    x, y = np.ones((2, 4)), np.array([0, 1])
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        mon._enqueue_batch_unchecked(_bad_label_batch(run_id, 3))
        deadline = time.monotonic() + 20
        with pytest.raises(vcid.VcidError, match="INVALID_ARGUMENT"):
            while time.monotonic() < deadline:
                mon.push(x, y, epoch=0)
                time.sleep(0.02)
    with pytest.raises(vcid.VcidError, match="INVALID_ARGUMENT"):
        with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
            mon._enqueue_batch_unchecked(_bad_label_batch(run_id, 5))


def test_closed_epoch_and_conflicting_run(daemon, run_id):
    x, y = np.eye(4), np.array([0, 1, 2, 0])
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        mon.push(x, y, epoch=0)
        mon.close_epoch(0)
        with pytest.raises(vcid.VcidError) as info:
            mon.close_epoch(0)
        assert info.value.code == "FAILED_PRECONDITION" and "epoch" in info.value.message
        with pytest.raises(vcid.VcidError) as info:
            mon.push(x, y, epoch=0)  # known closed: refused before anything is sent
        assert info.value.code == "FAILED_PRECONDITION"
        assert "epoch=None) continues at epoch 1" in info.value.context
        assert mon.pending == 0
        with pytest.raises(vcid.VcidError) as info:
            mon.close_epoch(9)
        assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(vcid.VcidError) as info:
        vcid.Monitor(run_id, num_classes=4, feature_dim=4, address=daemon.address)
    assert info.value.code == "ALREADY_EXISTS"
    assert "num_classes" in info.value.message
    # Same K and d: CreateRun is idempotent.
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as again:
        assert again.history()[0].samples == 4


# ------------------------------------------------------------ delivery


def test_push_does_not_block_while_another_run_is_closing(daemon, run_id):
    """A large close (d = 2048: an eigendecomposition that takes a while on
    2 cores) of run B must not hold up push() on run A. Asserted by order of
    events (pushes finished while the close was in flight) plus a loose
    ratio to a same-test baseline, not by absolute times."""
    rng = np.random.default_rng(1)
    big_d, k = 2048, 10
    xb = rng.standard_normal((2200, big_d)).astype(np.float32)
    yb = rng.integers(0, k, 2200)
    batch = rng.standard_normal((256, 512)).astype(np.float32)
    labels = rng.integers(0, k, 256)
    with vcid.Monitor(run_id + "-big", k, big_d, address=daemon.address) as big, \
            vcid.Monitor(run_id + "-small", k, 512, address=daemon.address) as small:
        for start in range(0, 2200, 256):
            big.push(xb[start:start + 256], yb[start:start + 256], epoch=0)
        big.flush()
        baseline = []
        for _ in range(20):
            t0 = time.perf_counter()
            small.push(batch, labels, epoch=0)
            baseline.append(time.perf_counter() - t0)
            time.sleep(0.005)
        small.flush()
        box = {}
        closer = threading.Thread(target=lambda: box.update(result=big.close_epoch(0)))
        closer.start()
        during, finished_during_close = [], 0
        while closer.is_alive() and len(during) < 25:  # stays below the outbox bound
            t0 = time.perf_counter()
            small.push(batch, labels, epoch=1)
            during.append(time.perf_counter() - t0)
            if closer.is_alive():
                finished_during_close += 1
            time.sleep(0.01)
        closer.join()
        summary = small.flush()
        r1 = small.close_epoch(1)
    assert box["result"].samples == 2200
    assert finished_during_close >= 3, (finished_during_close, box["result"].close_seconds)
    assert np.mean(during) < 20 * np.mean(baseline), (np.mean(during), np.mean(baseline))
    assert r1.samples == 256 * len(during)
    assert summary.rows_applied == 256 * (20 + len(during))


def test_replayed_writer_and_sequence_are_not_double_counted(daemon, run_id):
    rng = np.random.default_rng(2)
    x, y = ref.clustered(rng, 90, 4, 3)
    with vcid.Monitor(run_id, 3, 4, writer_id="writer-A", address=daemon.address) as first:
        for start in range(0, 90, 30):
            first.push(x[start:start + 30], y[start:start + 30], epoch=0)
        assert first.flush() == vcid.PushSummary(3, 90, 0)
    # A second process that reuses the writer id replays sequences 1..3.
    with vcid.Monitor(run_id, 3, 4, writer_id="writer-A", address=daemon.address) as replay:
        for start in range(0, 90, 30):
            replay.push(x[start:start + 30], y[start:start + 30], epoch=0)
        assert replay.flush() == vcid.PushSummary(0, 0, 3)
        replay.push(x[:30], y[:30], epoch=0)  # sequence 4: new
        assert replay.flush() == vcid.PushSummary(1, 30, 3)
        assert replay.close_epoch(0).samples == 120


def test_resend_after_a_broken_connection_is_not_double_counted(daemon, run_id):
    """The connection is cut (for real, at the TCP level) after the daemon
    applied ten batches but before it confirmed them; the Monitor reconnects
    and resends all ten with their original keys."""
    rng = np.random.default_rng(4)
    x, y = ref.clustered(rng, 300, 8, 3)
    proxy = CuttableProxy(daemon.grpc_port)
    try:
        with vcid.Monitor(run_id, 3, 8, address=daemon.address) as observer, \
                vcid.Monitor(run_id, 3, 8, ack_interval=60.0, address=proxy.address) as mon:
            for i in range(10):
                mon.push(x[20 * i:20 * i + 20], y[20 * i:20 * i + 20], epoch=0)
            deadline = time.monotonic() + 20
            while observer.run_info().rows_ingested < 200:
                assert time.monotonic() < deadline, "the daemon never applied the batches"
                time.sleep(0.02)
            assert mon.confirmed == vcid.PushSummary()  # applied, not yet confirmed
            assert proxy.cut() >= 1
            for i in range(10, 15):
                mon.push(x[20 * i:20 * i + 20], y[20 * i:20 * i + 20], epoch=0)
            summary = mon.flush()
            assert mon.reconnects >= 1
            assert summary == vcid.PushSummary(batches_applied=5, rows_applied=100, duplicates=10)
            result = mon.close_epoch(0)
    finally:
        proxy.close()
    assert result.samples == 300
    assert_matches_reference(result, x.astype(np.float32).astype(np.float64), y, 3)


def test_resend_after_a_daemon_restart_is_not_double_counted(fresh_daemon, run_id):
    """SIGTERM while a stream is open: the daemon checkpoints the applied
    batches with its duplicate filter; after the restart (same ports, same
    data directory) the Monitor resends and nothing is counted twice."""
    rng = np.random.default_rng(6)
    x, y = ref.clustered(rng, 300, 8, 3)
    with vcid.Monitor(run_id, 3, 8, ack_interval=60.0,
                      reconnect_timeout=60.0, address=fresh_daemon.address) as mon:
        for i in range(10):
            mon.push(x[20 * i:20 * i + 20], y[20 * i:20 * i + 20], epoch=0)
        deadline = time.monotonic() + 20
        while mon.run_info().rows_ingested < 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fresh_daemon.stop()
        for i in range(10, 15):  # queued while the daemon is down
            mon.push(x[20 * i:20 * i + 20], y[20 * i:20 * i + 20], epoch=0)
        fresh_daemon.start()
        summary = mon.flush(timeout=60)
        assert summary.duplicates == 10 and summary.rows_applied == 100
        result = mon.close_epoch(0)
    assert result.samples == 300
    assert_matches_reference(result, x.astype(np.float32).astype(np.float64), y, 3)


def test_full_outbox_blocks_then_raises_and_drops_nothing(fresh_daemon, run_id):
    x, y = np.eye(4), np.array([0, 1, 2, 0])
    with vcid.Monitor(run_id, 3, 4, queue_size=4,
                      queue_timeout=0.3, address=fresh_daemon.address) as mon:
        fresh_daemon.stop()
        for _ in range(4):
            mon.push(x, y, epoch=0)  # fits: 4 batches held
        t0 = time.monotonic()
        with pytest.raises(vcid.QueueFullError) as info:
            mon.push(x, y, epoch=0)
        assert time.monotonic() - t0 >= 0.3  # it waited before giving up
        assert "was not queued" in info.value.message
        assert mon.pending == 4
        fresh_daemon.start()
        assert mon.flush(timeout=60).rows_applied == 16
        assert mon.close_epoch(0).samples == 16


def test_unreachable_daemon_is_reported_after_reconnect_timeout(fresh_daemon, run_id):
    x, y = np.eye(4), np.array([0, 1, 2, 0])
    with pytest.raises(vcid.VcidError) as info:
        with vcid.Monitor(run_id, 3, 4, reconnect_timeout=1.0, address=fresh_daemon.address) as mon:
            fresh_daemon.stop()
            mon.push(x, y, epoch=0)
            mon.flush(timeout=30)
    assert info.value.code == "UNAVAILABLE"
    assert "gave up reconnecting" in info.value.context
    assert "1 batches (4 rows)" in info.value.context


def test_large_batches_are_split_below_the_message_limit(daemon, run_id):
    rng = np.random.default_rng(8)
    x, y = ref.clustered(rng, 1000, 32, 4)
    with vcid.Monitor(run_id, 4, 32, max_batch_bytes=16 * 1024, address=daemon.address) as mon:
        mon.push(x, y, epoch=0)
        summary = mon.flush()
        # (16384 - 1024) // (32 * 4 + 5) = 115 rows per message.
        assert summary == vcid.PushSummary(batches_applied=9, rows_applied=1000)
        result = mon.close_epoch(0)
    assert_matches_reference(result, x.astype(np.float32).astype(np.float64), y, 4)
