"""Nothing a live client holds is lost when the daemon is killed: a client
process (``durable_client.py``) pushes through ``vcid.Monitor`` while the
test kills the real daemon with SIGKILL at random moments and restarts it on
the same data directory and ports. Every epoch's ``EpochResult`` must equal
that of an uninterrupted run of the same client (samples exactly, metrics to
1e-12), none missing, none doubled. The daemon checkpoints every 0.5 s, so
kills land before, during and after checkpoints, pushes and closes.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vcid
from vcid.local import LocalDaemon

CLIENT = Path(__file__).resolve().parent / "durable_client.py"


def start_client(address: str, mode: str, epochs: int, out: Path,
                 pace: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLIENT), address, "durable", mode,
                             str(epochs), str(out), str(pace)])


def uninterrupted(vcid_command, tmp_path: Path, mode: str, epochs: int) -> list:
    out = tmp_path / "reference.json"
    with LocalDaemon(vcid_command, data_dir=tmp_path / "reference") as daemon:
        client = start_client(daemon.address, mode, epochs, out)
        assert client.wait(timeout=300) == 0
    return json.loads(out.read_text())


def killed(vcid_command, tmp_path: Path, mode: str, epochs: int, kills: int,
           seed: int) -> list:
    """The same client while the daemon is SIGKILLed ``kills`` times."""
    rng = random.Random(seed)
    out = tmp_path / "killed.json"
    wait = Path(str(out) + ".wait")
    wait.touch()  # the client's last epoch waits until every kill happened
    daemon = LocalDaemon(vcid_command, data_dir=tmp_path / "killed",
                         extra_args=["--checkpoint-interval", "0.5"])
    daemon.start()
    try:
        client = start_client(daemon.address, mode, epochs, out, pace=0.03)
        ready = Path(str(out) + ".ready")
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert client.poll() is None and time.monotonic() < deadline, "client not ready"
            time.sleep(0.02)
        for _ in range(kills):
            assert client.poll() is None, "the client ended before the kills"
            # Bounded random moments: while pushing, closing, checkpointing
            # or reconnecting.
            daemon_alive = rng.uniform(0.3, 1.2)
            try:
                client.wait(timeout=daemon_alive)
            except subprocess.TimeoutExpired:
                pass
            daemon.kill()
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.05, 0.5))
            daemon.start()
        wait.unlink()
        assert client.wait(timeout=300) == 0
        # The daemon's own history agrees with what the client was told.
        with vcid.Monitor("durable", 4, 8, address=daemon.address) as mon:
            history = [r.to_dict() for r in mon.history(None, None)]
    finally:
        daemon.close()
    results = json.loads(out.read_text())
    assert_same(history, results)
    return results


def assert_same(results: list, expected: list) -> None:
    def key(r):
        return (r["split"], r["layer"], r["epoch"])

    assert sorted(map(key, results)) == sorted(map(key, expected)), "missing or doubled"
    assert len(set(map(key, results))) == len(results), "an epoch closed twice"
    by_key = {key(r): r for r in results}
    for e in expected:
        r = by_key[key(e)]
        assert r["samples"] == e["samples"], key(e)
        assert r["classes_observed"] == e["classes_observed"]
        for name in vcid.EpochResult.METRICS:
            a, b = r[name], e[name]
            assert (a is None) == (b is None), (key(e), name, a, b)
            if a is not None:
                assert abs(a - b) <= 1e-12, (key(e), name, a, b)


@pytest.mark.parametrize("mode,epochs,kills", [("push", 20, 10), ("two_writers", 8, 6)])
def test_sigkill_at_random_moments_loses_nothing(vcid_command, tmp_path, mode, epochs, kills):
    expected = uninterrupted(vcid_command, tmp_path, mode, epochs)
    assert len(expected) == 2 * epochs
    assert all(r["samples"] > 0 for r in expected)
    results = killed(vcid_command, tmp_path, mode, epochs, kills, seed=epochs)
    assert_same(results, expected)
