#!/usr/bin/env python3
"""Cost of ``Monitor.push()`` to the caller, and end-to-end ingest rate.

    .venv/bin/python python/benchmarks/bench_push.py            # starts a daemon
    .venv/bin/python python/benchmarks/bench_push.py --address 127.0.0.1:50051

Batches of ``--rows`` x ``--dim`` float32 (default 256 x 512, 0.5 MiB). Every
number comes from the same run, next to its baselines:

* paced (a ``--step-seconds`` sleep after every call, standing in for a
  training step, so the daemon keeps up), interleaved call by call:
  - ``encode only``: the bare numpy work any client must do (``astype`` to
    little-endian float32 + ``tobytes`` + labels ``tolist``);
  - ``validate+encode``: the package's local checks, the encoding and the
    protobuf message, without queueing (``push`` minus the hand-off);
  - ``push()``: the real call.
  Pacing matters on this machine: the same code costs several times more
  when its data has gone cold between calls than in a tight loop.
* flat out: ``push()`` as fast as possible (it then waits for room in the
  bounded outbox) and end-to-end rows/s from the first push until
  ``flush()`` returns with every batch confirmed;
* ``raw gRPC stream``: the same batches pre-encoded and written into one
  ``Push`` stream with the bare generated stub, the rate without the client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import numpy as np

import vcid
from vcid._arrays import check_features, check_labels, encode
from vcid.local import LocalDaemon, find_vcid
from vcid.v1 import vcid_pb2 as pb
from vcid.v1 import vcid_pb2_grpc as pb_grpc


def timeit(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run(address, args):
    rng = np.random.default_rng(0)
    k, d, rows = 10, args.dim, args.rows
    batches = [rng.standard_normal((rows, d)).astype(np.float32) for _ in range(8)]
    labels = [rng.integers(0, k, rows) for _ in range(8)]
    mib = rows * d * 4 / 2**20
    step = args.step_seconds

    def encode_only(j):
        np.ascontiguousarray(batches[j], dtype="<f4").tobytes()
        labels[j].astype(np.uint32).tolist()

    def validate_encode(j):
        f = check_features(batches[j], d)
        y = check_labels(labels[j], rows, k)
        pb.FeatureBatch(run_id="r", epoch=0, rows=rows, features=encode(f, "float32"),
                        labels=y.tolist(), writer_id="w", sequence=1)

    run_id = f"bench-push-{uuid.uuid4().hex[:8]}"
    paced = {"encode only (numpy baseline)": [], "validate+encode, no queue (baseline)": [],
             "push()": []}
    with vcid.Monitor(run_id, num_classes=k, feature_dim=d, address=address) as mon:
        for j in range(8):  # warm up the stream
            mon.push(batches[j], labels[j], epoch=0)
        mon.flush()

        def push(j, epoch):
            mon.push(batches[j], labels[j], epoch=epoch)

        # Paced: a training step's worth of sleep after each call, the three
        # measurements interleaved so that they share the machine's state.
        for n in range(args.n):
            j = n % 8
            for name, fn in zip(paced, (encode_only, validate_encode,
                                        lambda j: push(j, 1))):
                t0 = time.perf_counter()
                fn(j)
                paced[name].append(time.perf_counter() - t0)
                time.sleep(step)
        mon.flush()

        # Flat out: as fast as possible; the bounded outbox makes push()
        # wait for the daemon, so end-to-end rows/s is the daemon's rate.
        flat = []
        before = mon.confirmed.rows_applied
        t_start = time.perf_counter()
        for n in range(args.n):
            t0 = time.perf_counter()
            push(n % 8, 2)
            flat.append(time.perf_counter() - t0)
        mon.flush()
        elapsed = time.perf_counter() - t_start
        assert mon.confirmed.rows_applied - before == rows * args.n
        for epoch in (0, 1, 2):
            mon.close_epoch(epoch)

    # Ceiling: the same batches pre-encoded, written into one Push stream
    # with the bare generated stub.
    import grpc
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.VciMonitorStub(channel)
    raw_run = run_id + "-raw"
    stub.CreateRun(pb.CreateRunRequest(run_id=raw_run, num_classes=k, feature_dim=d))
    msgs = [pb.FeatureBatch(run_id=raw_run, epoch=0, rows=rows,
                            features=batches[j].tobytes(), labels=labels[j].tolist())
            for j in range(8)]
    t0 = time.perf_counter()
    summary = stub.Push(msgs[j % 8] for j in range(args.n))
    elapsed_raw = time.perf_counter() - t0
    assert summary.rows_applied == rows * args.n
    channel.close()

    print(f"batches of {rows} x {d} float32 ({mib:.2f} MiB), {args.n} batches per line\n")
    print("| measurement | mean per batch | median | rows/s |")
    print("|---|---|---|---|")
    for name, times in paced.items():
        print(f"| paced ({step * 1e3:g} ms step): {name} | {statistics.mean(times) * 1e3:.3f} ms | "
              f"{statistics.median(times) * 1e3:.3f} ms | |")
    print(f"| flat out: push() | {statistics.mean(flat) * 1e3:.3f} ms | "
          f"{statistics.median(flat) * 1e3:.3f} ms | |")
    print(f"| flat out: end-to-end, first push() to flush() confirmed | "
          f"{elapsed / args.n * 1e3:.3f} ms | | {rows * args.n / elapsed:,.0f} |")
    print(f"| raw gRPC stream, pre-encoded (baseline) | {elapsed_raw / args.n * 1e3:.3f} ms | | "
          f"{rows * args.n / elapsed_raw:,.0f} |")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("-n", type=int, default=400, help="batches per measurement")
    p.add_argument("--step-seconds", type=float, default=0.01)
    args = p.parse_args(argv)
    if args.address:
        return run(args.address, args)
    with LocalDaemon(find_vcid()) as daemon:
        return run(daemon.address, args)


if __name__ == "__main__":
    sys.exit(main())
