"""``vcid.torch`` with real torch (modules, tensors, torch.distributed over
gloo on loopback) against ``LocalAccumulator``, the numpy reference and the
real daemon: the forward hooks, ``TorchAccumulator`` (statistics, merge,
no host synchronisation, bad batches) and a two-process data-parallel run."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vcid
import vcid.torch as vt

import reference as ref
from test_daemon import METRICS, assert_matches_reference

STATS = ("class_counts", "class_means", "scatter", "within_trace", "unit_sum", "unit_count",
         "unit_within_trace")


def assert_stats_close(got: vcid.LocalAccumulator, want: vcid.LocalAccumulator,
                       rel: float = 1e-9) -> None:
    """Field by field, within ``rel`` of the field's largest magnitude (unit
    statistics on their natural scale of 1)."""
    for name in STATS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        scale = max(np.abs(b).max(), 1.0 if name.startswith("unit") else 1e-300)
        err = np.abs(a - b).max() / scale
        assert err <= rel, f"{name}: relative difference {err:e}"


def assert_same_result(a: vcid.EpochResult, b: vcid.EpochResult, rel: float = 1e-9) -> None:
    for field in ("samples", "classes_observed", "feature_dim", "rank_total", "rank_between",
                  "small_sample"):
        assert getattr(a, field) == getattr(b, field), field
    for name in METRICS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x == pytest.approx(y, rel=rel, abs=1e-12), name


def batches(n: int, rng: np.random.Generator):
    start = 0
    while start < n:
        size = int(rng.integers(1, 97))
        yield slice(start, min(n, start + size))
        start += size


# ------------------------------------------------------------ FeatureHook


def test_real_torch_tensors_are_pushed(daemon, run_id):
    rng = np.random.default_rng(3)
    x, y = ref.clustered(rng, 200, 8, 3)
    t = torch.tensor(x, dtype=torch.float32, requires_grad=True) * 1.0
    labels = torch.tensor(y)
    with vcid.Monitor(run_id, 3, 8, encoding="bfloat16", address=daemon.address) as mon:
        mon.push(t, labels, epoch=0)                        # float32 tensor with grad
        mon.push(t.detach().to(torch.bfloat16), labels, epoch=0, split="bf16")  # bit for bit
        r32 = mon.close_epoch(0)
        r16 = mon.close_epoch(0, split="bf16")
    x_wire = t.detach().to(torch.bfloat16).float().numpy().astype(np.float64)
    assert_matches_reference(r32, x_wire, y, 3)
    assert r16.vci == r32.vci


def test_forward_hook_pushes_flattened_outputs_with_the_batch_labels(daemon, run_id):
    rng = np.random.default_rng(12)
    x, y = ref.clustered(rng, 120, 12, 3)
    maps = torch.tensor(x, dtype=torch.float32).reshape(120, 3, 2, 2)  # 4-D, like a conv map
    layer = torch.nn.ReLU()
    relu = np.maximum(x.astype(np.float32), 0).astype(np.float64)
    with vcid.Monitor(run_id, 3, 12, address=daemon.address) as mon:
        hook = vt.FeatureHook(mon, layer, epoch=0, layer="block4")
        for start in range(0, 120, 40):
            with hook.labels(torch.tensor(y[start:start + 40])):
                layer(maps[start:start + 40])
        layer(maps[:40])  # outside a labels block: not pushed
        hook.set_labels(y[:40])
        hook.epoch = 1
        layer(maps[:40])
        hook.remove()
        layer(maps[:40])  # removed: not pushed
        r0 = mon.close_epoch(0, layer="block4")
        r1 = mon.close_epoch(1, layer="block4")
    assert r0.samples == 120 and r1.samples == 40
    assert_matches_reference(r0, relu, y, 3)


def test_forward_hook_on_a_model_keeps_its_output_and_gradients(daemon, run_id):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(90, 6)
    y = torch.randint(0, 3, (90,))
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected_out = model(x).detach()
    model.zero_grad()
    with vcid.Monitor(run_id, 3, 8, address=daemon.address) as mon:
        hook = vt.FeatureHook(mon, model[1], epoch=0)
        with hook.labels(y):
            out = model(x)
            out.sum().backward()
        hook.remove()
        result = mon.close_epoch(0)
    assert torch.equal(out.detach(), expected_out)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    feats = model[1](model[0](x)).detach().numpy().astype(np.float64)
    assert result.samples == 90
    assert result.vci == pytest.approx(ref.metrics(feats, y.numpy(), 3)["vci"], rel=1e-6)


# ------------------------------------------------------------ TorchAccumulator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_accumulator_equals_local_accumulator(dtype):
    rng = np.random.default_rng(21)
    k, d = 9, 12
    # A large common offset, a class never seen (8), all-zero rows, and
    # features given as 4-D maps that flatten to d.
    x, y = ref.clustered(rng, 700, d, k - 1, offset=1e3)
    x[[3, 50, 400]] = 0.0
    x = torch.tensor(x, dtype=dtype).numpy().astype(np.float64)
    local = vcid.LocalAccumulator(k, d)
    acc = vt.TorchAccumulator(k, d)
    for part in batches(len(y), rng):
        local.update(x[part], y[part])
        acc.update(torch.tensor(x[part], dtype=dtype).reshape(-1, 3, 2, 2),
                   torch.tensor(y[part], dtype=torch.int32))
    assert acc.samples == 700 and acc.device == torch.device("cpu")
    assert_stats_close(acc.to_local(), local)
    assert acc.class_counts.dtype == torch.int64 and acc.scatter.dtype == torch.float64
    assert int(acc.class_counts[8]) == 0 and float(acc.class_means[8].abs().sum()) == 0.0


def test_merge_of_shards_equals_one_accumulator():
    rng = np.random.default_rng(5)
    k, d = 40, 6
    x, y = ref.clustered(rng, 500, d, k, offset=-20.0)
    whole = vt.TorchAccumulator(k, d).update(torch.tensor(x), torch.tensor(y))
    shards = [vt.TorchAccumulator(k, d) for _ in range(3)]
    for i, part in enumerate(batches(len(y), rng)):
        shards[int(rng.integers(0, 3))].update(torch.tensor(x[part]), torch.tensor(y[part]))
    merged = vt.TorchAccumulator(k, d)
    for s in shards:
        merged.merge(s)
    assert merged.samples == 500
    assert_stats_close(merged.to_local(), whole.to_local(), rel=1e-12)
    with pytest.raises(ValueError, match="num_classes=40, feature_dim=6"):
        merged.merge(vt.TorchAccumulator(k, d + 1))


def test_update_never_looks_at_values_on_the_host():
    """On the meta device tensors have shapes but no values: any ``.item()``,
    ``.cpu()`` or Python branch on a tensor value raises there. ``update``
    and ``merge`` must run through."""
    k, d = 10, 16
    acc = vt.TorchAccumulator(k, d, device="meta")
    x = torch.empty(64, d, device="meta")
    y = torch.empty(64, dtype=torch.int64, device="meta")
    acc.update(x, y)
    acc.update(x.reshape(64, 4, 4), y)
    acc.merge(vt.TorchAccumulator(k, d, device="meta").update(x, y))
    assert acc._scatter.device.type == "meta" and acc._scatter.shape == (d, d)


def test_bad_batches_are_left_out_and_reported():
    rng = np.random.default_rng(8)
    k, d = 3, 4
    x, y = ref.clustered(rng, 60, d, k)
    good = vt.TorchAccumulator(k, d).update(torch.tensor(x), torch.tensor(y))
    acc = vt.TorchAccumulator(k, d).update(torch.tensor(x), torch.tensor(y))
    nan = torch.tensor(x[:5]).clone()
    nan[2, 1] = float("nan")
    acc.update(nan, torch.tensor(y[:5]))
    acc.update(torch.tensor(x[:5]), torch.tensor([0, 1, 3, 0, 1]))  # label 3 >= K
    acc.update(torch.tensor(x[:5]), torch.tensor([0, 1, -1, 0, 1]))
    assert acc.rejected_batches == 3 and acc.samples == 60
    for name in ("_counts", "_means", "_scatter", "_within", "_unit_sum", "_unit_within"):
        assert torch.equal(getattr(acc, name), getattr(good, name)), name
    with pytest.raises(ValueError, match=r"received 3 batch\(es\)"):
        acc.to_local()
    # Shapes, dtypes and devices are checked at once.
    for features, labels, message in [
        (torch.zeros(5, d + 1), torch.zeros(5, dtype=torch.int64), "4 values per row"),
        (torch.zeros(5, d), torch.zeros(4, dtype=torch.int64), r"expected shape \(5,\)"),
        (torch.zeros(5, d), torch.zeros(5), "integer tensor"),
        (torch.zeros(5, d, dtype=torch.int32), torch.zeros(5, dtype=torch.int64),
         "floating-point"),
        (torch.zeros(0, d), torch.zeros(0, dtype=torch.int64), "rows >= 1"),
        (np.zeros((5, d)), torch.zeros(5, dtype=torch.int64), "torch.Tensor"),
        (torch.zeros(5, d, device="meta"), torch.zeros(5, dtype=torch.int64), "on cpu"),
    ]:
        with pytest.raises(ValueError, match=message):
            good.update(features, labels)
    assert good.samples == 60 and good.rejected_batches == 0


def test_push_stats_equals_raw_pushes(daemon, run_id):
    rng = np.random.default_rng(30)
    k, d = 6, 20
    x, y = ref.clustered(rng, 900, d, k, offset=50.0)
    x32 = x.astype(np.float32)
    acc = vt.TorchAccumulator(k, d)
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        for part in batches(len(y), rng):
            mon.push(x32[part], y[part], epoch=0, split="raw")
            acc.update(torch.tensor(x32[part]), torch.tensor(y[part]))
        raw = mon.close_epoch(0, split="raw")
        summary = mon.push_stats(acc, epoch=0, split="device")
        device = mon.close_epoch(0, split="device")
    assert summary.rows_applied == 900
    assert_same_result(device, raw)
    assert_matches_reference(device, x32.astype(np.float64), y, k, rel=1e-9)


def test_accumulating_hook_pushes_once_per_epoch(daemon, run_id):
    rng = np.random.default_rng(31)
    k, d = 4, 10
    x, y = ref.clustered(rng, 300, d, k)
    layer = torch.nn.Identity()
    with vcid.Monitor(run_id, k, d, address=daemon.address) as mon:
        hook = vt.AccumulatingHook(mon, layer, layer="penultimate")
        results = []
        for epoch in range(2):  # epoch None: the hook follows the Monitor's epoch
            rows = 300 - 100 * epoch
            for part in batches(rows, rng):
                with hook.labels(torch.tensor(y[part])):
                    layer(torch.tensor(x[part]))
            layer(torch.tensor(x[:10]))  # no labels: not recorded
            results.append(hook.close_epoch())
        hook.remove()
        confirmed = mon.confirmed
    assert [r.samples for r in results] == [300, 200]
    assert confirmed.batches_applied == 0  # nothing went through Push
    assert_matches_reference(results[0], x, y, k, rel=1e-9)
    assert_matches_reference(results[1], x[:200], y[:200], k, rel=1e-9)


# ------------------------------------------------------------ two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, address: str, run_id: str,
               out_path: str) -> None:
    """One data-parallel rank: its shard of the digits through an
    AccumulatingHook; rank 0 holds the Monitor and writes the result."""
    from sklearn.datasets import load_digits

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        x, y = load_digits(return_X_y=True)
        mine = np.arange(len(y)) % world == rank
        xs, ys = torch.tensor(x[mine], dtype=torch.float32), torch.tensor(y[mine])
        layer = torch.nn.Identity()
        mon = vcid.Monitor(run_id, 10, 64, address=address) if rank == 0 else None
        hook = vt.AccumulatingHook(mon, layer, num_classes=10, feature_dim=64)
        for start in range(0, len(ys), 50 + 13 * rank):  # different batchings per rank
            with hook.labels(ys[start:start + 50 + 13 * rank]):
                layer(xs[start:start + 50 + 13 * rank])
        result = hook.close_epoch()
        if mon is not None:
            mon.close()
            with open(out_path, "w") as f:
                json.dump({name: getattr(result, name) for name in
                           METRICS + ("samples", "rank_total", "rank_between")}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_all_reduce_equals_one_process_pushing_every_row(daemon, run_id, tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "rank0.json"
    mp.spawn(_rank_main, args=(2, _free_port(), daemon.address, run_id, str(out)), nprocs=2,
             join=True)
    got = json.loads(out.read_text())
    x, y = load_digits(return_X_y=True)
    with vcid.Monitor(run_id, 10, 64, address=daemon.address) as mon:
        for start in range(0, len(y), 64):
            mon.push(x[start:start + 64], y[start:start + 64], epoch=0, split="raw")
        raw = mon.close_epoch(0, split="raw")
    assert got["samples"] == raw.samples == len(y)
    assert (got["rank_total"], got["rank_between"]) == (raw.rank_total, raw.rank_between)
    for name in METRICS:
        assert got[name] == pytest.approx(getattr(raw, name), rel=1e-9, abs=1e-12), name
