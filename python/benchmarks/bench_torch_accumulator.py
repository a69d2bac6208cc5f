"""Cost of ``vcid.torch.TorchAccumulator.update`` on the CPU, next to torch's
own float64 ``X.T @ X`` on the same batch, interleaved in the same run; and,
for the raw-push vs device-accumulation crossover, the training process's
cost per batch of ``Monitor.push()`` against ``update`` at several d.

    cargo build --release --all-targets
    .venv/bin/python python/benchmarks/bench_torch_accumulator.py          # ~1 min
    .venv/bin/python python/benchmarks/bench_torch_accumulator.py --no-push  # update only

Part 1 (the target: update within 1.25x of X.T @ X): 256 x 2048 float64
batches, K = 10 and K = 1000, ``torch.get_num_threads()`` threads; each
repetition times the baseline and ``update`` back to back, and the table
gives the median over repetitions and the ratio of medians.

Part 2: per 256-row float32 batch, ``Monitor.push()`` (encode and queue;
the daemon does the d x d work on its own cores) against ``update`` (the
d x d work in the training process), and the daemon's sustained rate for
raw pushes, d in {128, 512, 2048}. Daemon started by the script on
loopback (``target/release/vcid``, or ``$VCID_BIN``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import vcid
from vcid.local import LocalDaemon
from vcid.torch import TorchAccumulator

REPO = Path(__file__).resolve().parents[2]


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def part_update(reps: int) -> None:
    rows, d = 256, 2048
    print(f"part 1: update vs X.T @ X, {rows} x {d} float64, {torch.get_num_threads()} threads, "
          f"{reps} interleaved repetitions")
    print(f"{'K':>6} {'X.T@X ms':>10} {'update ms':>10} {'ratio':>7}")
    gen = torch.Generator().manual_seed(0)
    for k in (10, 1000):
        x = torch.randn(rows, d, generator=gen, dtype=torch.float64) + 3.0
        y = torch.randint(0, k, (rows,), generator=gen)
        acc = TorchAccumulator(k, d)
        acc.update(x, y)  # warm-up (allocations, threads)
        _ = x.T @ x
        base, upd = [], []
        for _ in range(reps):
            base += timed(lambda: x.T @ x, 1)
            upd += timed(lambda: acc.update(x, y), 1)
        b, u = statistics.median(base), statistics.median(upd)
        print(f"{k:>6} {b * 1e3:>10.2f} {u * 1e3:>10.2f} {u / b:>7.2f}")


def part_crossover(batches: int) -> None:
    binary = os.environ.get("VCID_BIN", str(REPO / "target" / "release" / "vcid"))
    print(f"\npart 2: per 256-row float32 batch in the training process, K = 10, "
          f"{batches} batches per line")
    print(f"{'d':>6} {'push() ms':>10} {'update ms':>10} {'daemon rows/s (raw)':>20} "
          f"{'update rows/s':>14} {'push_stats ms':>14}")
    rng = np.random.default_rng(1)
    daemon = LocalDaemon([binary])
    daemon.start()
    try:
        for d in (128, 512, 2048):
            k = 10
            x = rng.standard_normal((batches, 256, d)).astype(np.float32)
            y = rng.integers(0, k, size=(batches, 256))
            run = f"bench-torch-{d}-{os.getpid()}"
            with vcid.Monitor(run, k, d, address=daemon.address, queue_size=batches + 1) as mon:
                t0 = time.perf_counter()
                push = []
                for i in range(batches):
                    p0 = time.perf_counter()
                    mon.push(x[i], y[i], epoch=0, split="raw")
                    push.append(time.perf_counter() - p0)
                mon.flush()
                daemon_rate = batches * 256 / (time.perf_counter() - t0)
                xt, yt = torch.from_numpy(x), torch.from_numpy(y)
                TorchAccumulator(k, d).update(xt[0], yt[0])  # warm-up
                acc = TorchAccumulator(k, d)
                upd = timed(lambda: [acc.update(xt[i], yt[i]) for i in range(batches)], 1)[0]
                s0 = time.perf_counter()
                mon.push_stats(acc, epoch=0, split="device")
                stats_ms = (time.perf_counter() - s0) * 1e3
                raw = mon.close_epoch(0, split="raw")
                device = mon.close_epoch(0, split="device")
                # Both paths hold the same rows: the same statistics.
                assert raw.samples == device.samples == batches * 256
                assert abs(raw.vci - device.vci) <= 1e-9, (raw.vci, device.vci)
            print(f"{d:>6} {statistics.median(push) * 1e3:>10.3f} {upd / batches * 1e3:>10.3f} "
                  f"{daemon_rate:>20.0f} {batches * 256 / upd:>14.0f} {stats_ms:>14.1f}")
    finally:
        daemon.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--no-push", action="store_true", help="part 1 only")
    args = ap.parse_args()
    part_update(args.reps)
    if not args.no_push:
        part_crossover(args.batches)


if __name__ == "__main__":
    main()
