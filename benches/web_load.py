#!/usr/bin/env python3
"""Load of the web view and HTTP API with many runs and long histories.

Starts the real daemon (`vcid serve`, free loopback ports, a temporary data
directory), creates RUNS runs of EPOCHS closed epochs each (train, and val
for the first run) through real gRPC (`PushStats` of a tiny K=2, d=2 block,
then `CloseEpoch`, each close durable), then measures:

  * GET /api/v1/runs and GET /api/v1/runs/r000/history: bytes and time
    (median of 5);
  * the page in Chromium (/usr/bin/chromium via Playwright, if installed):
    time from navigation until both charts of r000 are drawn with every
    epoch.

Usage (with the package installed: pip install ./python):
VCID_BIN=target/release/vcid python benches/web_load.py [RUNS] [EPOCHS]
(defaults 100 and 1000). Bounded: it stops by itself after the measurement.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from vcid import LocalAccumulator
from vcid.local import LocalDaemon
from vcid.v1 import vcid_pb2 as pb
from vcid.v1 import vcid_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def block(run: str, split: str, epoch: int, rng) -> pb.StatsBlock:
    x = rng.standard_normal((16, 2)) + np.repeat(np.eye(2) * (2 + epoch / 100), 8, axis=0)
    y = np.repeat(np.arange(2), 8)
    acc = LocalAccumulator(2, 2)
    acc.update(x, y)
    return acc.to_proto(run, split, "penultimate", epoch)


def fill(address: str, run: str, epochs: int, splits) -> None:
    rng = np.random.default_rng(abs(hash(run)) % 2**32)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.VciMonitorStub(channel)
        stub.CreateRun(pb.CreateRunRequest(run_id=run, num_classes=2, feature_dim=2,
                                           metadata={"model": "load", "seed": run}))
        for epoch in range(epochs):
            for split in splits:
                stub.PushStats(block(run, split, epoch, rng))
                stub.CloseEpoch(pb.CloseEpochRequest(run_id=run, split=split,
                                                     layer="penultimate", epoch=epoch))


def timed_get(url: str, repeat: int = 5):
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        with urllib.request.urlopen(url) as resp:
            size = len(resp.read())
        times.append(time.perf_counter() - start)
    return size, statistics.median(times)


def page_load(url: str, points: int):
    chromium = os.environ.get("VCID_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not os.access(chromium, os.X_OK):
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        times = []
        for _ in range(3):
            page.goto("about:blank")
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_function(
                """n => { const c = window.vcid && window.vcid.charts;
                         return c && c.vci && c.metric && c.vci.data[0].length === n
                                && c.metric.data[0].length === n; }""",
                arg=points, timeout=60000)
            times.append(time.perf_counter() - start)
        browser.close()
    return statistics.median(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    binary = os.environ.get("VCID_BIN", str(REPO / "target" / "release" / "vcid"))
    with LocalDaemon([binary]) as daemon:
        start = time.perf_counter()
        done = [0]
        lock = threading.Lock()

        def one(i: int) -> None:
            fill(daemon.address, f"r{i:03d}", epochs, ("train", "val") if i == 0 else ("train",))
            with lock:
                done[0] += 1

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(runs)))
        closes = runs * epochs + epochs
        fill_s = time.perf_counter() - start
        print(f"filled {runs} runs x {epochs} epochs ({closes} durable closes) in {fill_s:.0f} s")
        base = f"http://{daemon.http_address}"
        size, t = timed_get(base + "/api/v1/runs")
        print(f"GET /api/v1/runs: {size / 1e3:.0f} kB in {t * 1e3:.1f} ms (median of 5)")
        size, t = timed_get(base + "/api/v1/runs/r000/history")
        print(f"GET /api/v1/runs/r000/history ({2 * epochs} results): "
              f"{size / 1e6:.2f} MB in {t * 1e3:.1f} ms (median of 5)")
        size, t = timed_get(base + "/api/v1/runs/r000/history?format=csv")
        print(f"GET /api/v1/runs/r000/history?format=csv: {size / 1e6:.2f} MB in {t * 1e3:.1f} ms")
        loaded = page_load(base + "/#run=r000", epochs)
        if loaded is not None:
            print(f"page /#run=r000 in Chromium, navigation to both charts drawn "
                  f"({runs} runs listed, 2 x {epochs} points): {loaded * 1e3:.0f} ms (median of 3)")


if __name__ == "__main__":
    main()
