"""The client process of ``test_durability.py``: pushes a deterministic
training run through ``vcid.Monitor`` (one writer, or two writers into the
same epochs, one of them also sending ``PushStats`` blocks) and writes every
``EpochResult`` that ``close_epoch`` returned to a JSON file.

Usage: ``python durable_client.py ADDRESS RUN MODE EPOCHS OUT.json [PACE_S]``
with MODE ``push`` or ``two_writers``. ``PACE_S`` (default 0) is a sleep
between batches so that a killer has moments to hit. Once its Monitors are
connected it creates ``OUT.json.ready``; with a file ``OUT.json.wait``
present, the last epoch waits until it is removed (so every kill lands
while the run is in progress).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import numpy as np

import vcid

K, D, ROWS, BATCHES = 4, 8, 24, 5
SPLITS = ("train", "val")


def data(epoch: int, split: str, part: int):
    """Batch ``part`` of (epoch, split): clustered features, fixed seed."""
    rng = np.random.default_rng([epoch, SPLITS.index(split), part])
    y = rng.integers(0, K, ROWS)
    means = np.random.default_rng(99).normal(0, 3, (K, D)) * (1 + 0.1 * epoch)
    return (means[y] + rng.normal(0, 1, (ROWS, D))).astype(np.float32), y


def monitor(address: str, run: str) -> vcid.Monitor:
    return vcid.Monitor(run, K, D, address=address, reconnect_timeout=120.0,
                        ack_interval=0.2, timeout=120.0, connect_timeout=60.0)


def main() -> None:
    address, run, mode, epochs, out = sys.argv[1:6]
    pace = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    epochs = int(epochs)
    results = []
    wait_file = out + ".wait"

    def hold_last(epoch: int) -> None:
        if epoch == epochs - 1:
            deadline = time.monotonic() + 300
            while os.path.exists(wait_file) and time.monotonic() < deadline:
                time.sleep(0.05)

    def ready() -> None:
        open(out + ".ready", "w").close()

    if mode == "push":
        with monitor(address, run) as mon:
            ready()
            for epoch in range(epochs):
                hold_last(epoch)
                for split in SPLITS:
                    for part in range(BATCHES):
                        mon.push(*data(epoch, split, part), epoch=epoch, split=split)
                        time.sleep(pace)
                for split in SPLITS:
                    results.append(mon.close_epoch(epoch, split=split).to_dict())
    elif mode == "two_writers":
        # Writer A pushes the even batches and closes; writer B pushes the
        # odd batches and, for the val split, PushStats blocks instead.
        barrier = threading.Barrier(2, timeout=300)
        errors = []
        b_monitor = monitor(address, run)

        def writer_b() -> None:
            try:
                with b_monitor as mon:
                    for epoch in range(epochs):
                        for split in SPLITS:
                            for part in range(1, BATCHES, 2):
                                x, y = data(epoch, split, part)
                                if split == "val":
                                    acc = vcid.LocalAccumulator(K, D).update(
                                        x.astype(np.float64), y)
                                    mon.push_stats(acc, epoch=epoch, split=split)
                                else:
                                    mon.push(x, y, epoch=epoch, split=split)
                                time.sleep(pace)
                        mon.flush()
                        barrier.wait()  # B's share is applied
                        barrier.wait()  # A closed the epoch
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)
                barrier.abort()

        a_monitor = monitor(address, run)
        thread = threading.Thread(target=writer_b)
        thread.start()
        try:
            with a_monitor as mon:
                ready()
                for epoch in range(epochs):
                    hold_last(epoch)
                    for split in SPLITS:
                        for part in range(0, BATCHES, 2):
                            mon.push(*data(epoch, split, part), epoch=epoch, split=split)
                            time.sleep(pace)
                    mon.flush()
                    barrier.wait()
                    for split in SPLITS:
                        results.append(mon.close_epoch(epoch, split=split).to_dict())
                    barrier.wait()
        except BaseException:
            barrier.abort()
            raise
        finally:
            thread.join()
            # Whichever writer failed first, show its own traceback: the
            # other one only sees the broken barrier.
            for err in errors:
                traceback.print_exception(err, file=sys.stderr)
        if errors:
            raise SystemExit("writer B failed (traceback above)")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
