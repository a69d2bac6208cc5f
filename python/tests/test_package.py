"""One package, both halves: the built wheel installs into a fresh venv and
gives the ``vcid`` command (every subcommand of the Rust binary) and the
in-process math; ``vcid.compute`` equals ``vcid compute`` on the same
``.npy`` files and the two-pass numpy reference.

The wheel is ``$VCID_WHEEL``, else the newest ``target/wheels/vcid-*.whl``
(``.ci/run`` builds it once with ``pip wheel ./python``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

import vcid
import reference as ref

REPO = Path(__file__).resolve().parents[2]
METRICS = ("vci", "linear_probe_mse", "nc1", "cdnv", "class_separation", "equinorm",
           "equiangularity", "effective_rank")


def _wheel() -> Path:
    env = os.environ.get("VCID_WHEEL")
    if env:
        return Path(env)
    wheels = sorted((REPO / "target" / "wheels").glob("vcid-*.whl"),
                    key=lambda p: p.stat().st_mtime)
    if not wheels:
        pytest.fail("wheel: expected $VCID_WHEEL or target/wheels/vcid-*.whl (build it with "
                    "`pip wheel --no-deps -w target/wheels ./python`), received none")
    return wheels[-1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv with nothing but the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", str(_wheel())], check=True, timeout=900)
    return root


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("VCID_")}


def test_the_wheel_gives_the_vcid_command(fresh_venv):
    vcid_cmd = fresh_venv / "bin" / "vcid"
    help_text = subprocess.run([str(vcid_cmd), "--help"], capture_output=True, text=True,
                               env=_clean_env(), timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    for sub in ("serve", "compute", "demo", "runs", "history", "delete", "stop"):
        assert f"  {sub}" in help_text.stdout, sub
    usage = subprocess.run([str(vcid_cmd), "no-such-command"], capture_output=True, text=True,
                           env=_clean_env(), timeout=60)
    assert usage.returncode == 2 and "unrecognized subcommand" in usage.stderr
    demo = subprocess.run([str(vcid_cmd), "demo", "--epochs", "2"], capture_output=True,
                          text=True, env=_clean_env(), timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "vci" in demo.stdout.lower()


def test_the_wheel_computes_in_process(fresh_venv):
    code = ("import numpy as np, vcid; rng = np.random.default_rng(0); "
            "y = np.repeat(np.arange(3), 50); "
            "x = 5.0 * np.eye(3, 6)[y] + rng.normal(size=(150, 6)); "
            "r = vcid.compute(x, y); print(r.samples, r.classes_observed, r.vci)")
    out = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, env=_clean_env(), timeout=60, cwd=str(fresh_venv))
    assert out.returncode == 0, out.stderr
    samples, classes, vci = out.stdout.split()
    assert (samples, classes) == ("150", "3") and 0.0 < float(vci) < 0.3


def test_compute_equals_the_cli_and_the_reference(tmp_path):
    rng = np.random.default_rng(11)
    x, y = ref.clustered(rng, 900, 12, 5, offset=7.0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.int64))
    cli = subprocess.run([sys.executable, "-m", "vcid", "compute", "--features",
                          str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    result = vcid.compute(x, y)
    want = ref.metrics(x, y, 5)
    for key in ("samples", "classes_observed", "feature_dim", "rank_total", "rank_between",
                "small_sample"):
        assert getattr(result, key) == from_cli[key] == want[key], key
    for name in METRICS:
        got = getattr(result, name)
        assert got == pytest.approx(from_cli[name], rel=1e-12, abs=1e-12), name
        assert got == pytest.approx(want[name], rel=1e-12, abs=1e-12), name
    # The accumulator path gives the same numbers, batch by batch.
    acc = vcid.LocalAccumulator(5, 12)
    for start in range(0, 900, 128):
        acc.update(x[start:start + 128], y[start:start + 128])
    for name in METRICS:
        assert getattr(acc.metrics(), name) == pytest.approx(from_cli[name], rel=1e-12,
                                                             abs=1e-12), name


def test_compute_takes_tensor_likes_and_checks_its_arguments():
    rng = np.random.default_rng(3)
    x, y = ref.clustered(rng, 200, 5, 4)

    class ArrayLike:
        def __array__(self, dtype=None, copy=None):
            return x.astype(np.float32)

    as_f32 = vcid.compute(x.astype(np.float32), y)
    assert vcid.compute(ArrayLike(), y.tolist(), num_classes=4).vci == as_f32.vci
    assert vcid.compute(x, y, num_classes=6).classes_observed == 4
    cases = [
        (lambda: vcid.compute(x[:, 0], y), "features", r"expected a 2-D array"),
        (lambda: vcid.compute(x, y[:-1]), "labels", r"expected 200 labels"),
        (lambda: vcid.compute(x, y, num_classes=3), "labels", r"expected every label in \[0, 3\)"),
        (lambda: vcid.compute(x, y, num_classes=0), "num_classes", r"expected an integer"),
        (lambda: vcid.compute(np.where(x > 0, np.nan, x), y), "features", "finite"),
    ]
    for call, field, message in cases:
        with pytest.raises(vcid.ArgumentError, match=message) as info:
            call()
        assert info.value.field == field
    single = vcid.compute(x, np.zeros(200, int))
    assert single.vci is None and "vci" in single.notes


def test_stats_blocks_are_checked_by_the_daemons_own_function(daemon, run_id):
    """from_stats and PushStats accept and refuse the same blocks, with the
    same message (one Rust function): here a scatter whose triangles differ
    by 1e-10 of its largest entry, which the daemon used to accept (its
    tolerance was 1e-9) while the client refused it (1e-12)."""
    rng = np.random.default_rng(5)
    x, y = ref.clustered(rng, 100, 4, 3)
    acc = vcid.LocalAccumulator(3, 4).update(x, y)
    scatter = acc.scatter
    scatter[0, 1] += 1e-10 * np.diag(scatter).max()
    parts = [acc.class_counts, acc.class_means, scatter, acc.within_trace, acc.unit_sum,
             acc.unit_count, acc.unit_within_trace]
    with pytest.raises(vcid.ArgumentError) as local:
        vcid.LocalAccumulator.from_stats(*parts)
    assert local.value.field == "scatter"
    block = acc.to_proto(run_id, "train", "penultimate", 0)
    del block.scatter[:]
    block.scatter.extend(scatter.ravel().tolist())
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        stub = vcid.v1.vcid_pb2_grpc.VciMonitorStub(mon._conn.channel)
        with pytest.raises(Exception) as remote:
            stub.PushStats(block, timeout=30)
    assert remote.value.code().name == "INVALID_ARGUMENT"
    assert str(local.value) in remote.value.details()


def test_python_and_deploy_docs_cite_the_repository_not_spec():
    """The specification is not shipped; docs and comments point to
    docs/metrics.md instead."""
    needles = ("SPEC" + ".md", "SPEC" + " §")
    cited = []
    for folder in (REPO / "python", REPO / "deploy"):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".yml", ".yaml", ".json",
                                                   ".toml", ".pyi", ".rs"}:
                text = path.read_text(errors="replace")
                if any(needle in text for needle in needles):
                    cited.append(str(path.relative_to(REPO)))
    assert cited == []


def test_signals_and_exit_status_match_the_binary(tmp_path):
    """`vcid serve` ends gracefully on SIGINT and SIGTERM (status 0, no
    Python traceback, daemon.json removed); a command without a handler dies
    of SIGINT as the binary does; bad input is status 2."""
    import signal
    import time

    from vcid.local import free_port

    for sig in (signal.SIGINT, signal.SIGTERM):
        data = tmp_path / f"data-{sig.name}"
        proc = subprocess.Popen([sys.executable, "-m", "vcid", "serve", "--grpc-addr",
                                 f"127.0.0.1:{free_port()}", "--http-addr",
                                 f"127.0.0.1:{free_port()}", "--data-dir", str(data)],
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (data / "daemon.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "checkpointed; stopped" in err
        assert not (data / "daemon.json").exists()

    demo = subprocess.Popen([sys.executable, "-m", "vcid", "demo", "--epochs", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == -signal.SIGINT and "Traceback" not in err
    bad = subprocess.run([sys.executable, "-m", "vcid", "compute", "--features",
                          str(tmp_path / "missing.npy"), "--labels", str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("vcid: error: ")
