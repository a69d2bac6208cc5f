"""Fixtures of the browser suite: the real release binary (`vcid serve` on
ephemeral loopback ports with a temporary data directory), fed over gRPC
through the generated stubs (`vcid.v1`), and Debian's Chromium driven by
Playwright.

Playwright never downloads a browser here: Chromium is launched from
/usr/bin/chromium (override with VCID_CHROMIUM) with a fresh profile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from vcid.v1 import vcid_pb2 as pb
from vcid.v1 import vcid_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]

CHROMIUM = os.environ.get("VCID_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def vcid_command():
    """``$VCID_BIN`` or ``target/release/vcid``; fails (not skips) without it."""
    env = os.environ.get("VCID_BIN")
    path = Path(env) if env else REPO / "target" / "release" / "vcid"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"vcid binary: expected an executable at {path} (set VCID_BIN or run "
                    f"`cargo build --release`), received none")
    return [str(path)]


class Daemon:
    """`vcid serve` on ephemeral loopback ports; the bound addresses are read
    from its JSON log line "vcid serving"."""

    def __init__(self, command, data_dir: Path, extra=()):
        self.proc = subprocess.Popen(
            command + ["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                       "--data-dir", str(data_dir), "--log-format", "json", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        for line in self.proc.stderr:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "vcid serving":
                self.address, self.http_address = fields["grpc"], fields["http"]
                break
        else:
            raise RuntimeError(f"vcid serve exited with {self.proc.wait()} before serving")
        # Keep draining the log so the daemon never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Feeder:
    """A training run as the daemon sees it, over raw gRPC: create, push
    labelled Gaussian clusters, close, finish, delete, read history."""

    K, D = 3, 4

    def __init__(self, address: str, token: str = ""):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.VciMonitorStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")] if token else None

    def create(self, run: str, metadata=None):
        return self.stub.CreateRun(pb.CreateRunRequest(
            run_id=run, num_classes=self.K, feature_dim=self.D, metadata=metadata or {}),
            metadata=self.md)

    def push(self, run: str, epoch: int, split: str = "train", spread: float = 1.0,
             one_class: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed + 1000 * epoch + len(split))
        labels = np.zeros(60, dtype=np.int64) if one_class else np.arange(60) % self.K
        x = np.eye(self.K, self.D)[labels] * 6.0 + spread * rng.standard_normal((60, self.D))
        batch = pb.FeatureBatch(run_id=run, split=split, epoch=epoch, rows=60,
                                features=x.astype("<f4").tobytes(), labels=labels.tolist())
        self.stub.Push(iter([batch]), metadata=self.md)

    def close(self, run: str, epoch: int, split: str = "train"):
        return self.stub.CloseEpoch(pb.CloseEpochRequest(run_id=run, split=split, epoch=epoch),
                                    metadata=self.md)

    def epochs(self, run: str, epochs, splits=("train", "val"), undefined=()):
        """Push and close each (split, epoch), collapsing with the epoch;
        the (split, epoch) pairs in ``undefined`` get one class only (VCI
        undefined there)."""
        for epoch in epochs:
            for split in splits:
                self.push(run, epoch, split, spread=2.0 / (1 + epoch),
                          one_class=(split, epoch) in undefined)
                self.close(run, epoch, split)

    def history(self, run: str):
        return list(self.stub.GetHistory(pb.GetHistoryRequest(run_id=run),
                                         metadata=self.md).results)

    def run(self, run: str):
        return self.stub.GetRun(pb.GetRunRequest(run_id=run), metadata=self.md)

    def finish(self, run: str):
        return self.stub.FinishRun(pb.FinishRunRequest(run_id=run), metadata=self.md)

    def delete(self, run: str):
        self.stub.DeleteRun(pb.DeleteRunRequest(run_id=run), metadata=self.md)


@pytest.fixture
def daemon(vcid_command, tmp_path):
    d = Daemon(vcid_command, tmp_path / "data")
    yield d
    d.stop()


@pytest.fixture
def feeder(daemon):
    f = Feeder(daemon.address)
    yield f
    f.channel.close()


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    """One Chromium (fresh profile) for the session; each test opens pages in
    a fresh incognito-like context of it."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"chromium: expected an executable at {CHROMIUM} "
                    f"(apt-get install chromium), received none")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser_context):
    browser_context.clear_cookies()
    page = browser_context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
