"""From ``pip install`` to a VCI curve: a Monitor with no address starts a
local daemon (the installed package's ``vcid serve``), a second run of the
same script resumes the run and appends epochs, racing scripts share one
daemon, ``vcid stop`` ends it, and an address that does not answer fails
fast with the command line's hint.

Every test runs the real daemon on loopback with a temporary HOME and
XDG_DATA_HOME and free ports (``VCID_ADDR``, ``VCID_HTTP_ADDR``), so the
user's data directory and ports 50051/9464 are never touched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

import vcid
from vcid.local import free_port

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import vcid

    run, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 40)
    with vcid.Monitor(run=run, num_classes=3, feature_dim=4) as mon:
        for _ in range(2):
            x = 4.0 * np.eye(3, 4)[y] + rng.normal(size=(120, 4))
            mon.push(x, y)
            result = mon.close_epoch()
            print(result.epoch, result.samples, result.vci, flush=True)
""")


@pytest.fixture
def isolated(tmp_path):
    """An environment with its own HOME, XDG_DATA_HOME and free ports, and
    whatever daemon it started stopped afterwards."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VCID_ADDR", "VCID_DATA_DIR", "VCID_HTTP_ADDR", "VCID_AUTOSTART",
                        "VCID_CONFIG", "VCID_GRPC_ADDR")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "xdg"),
               VCID_ADDR=f"127.0.0.1:{free_port()}",
               VCID_HTTP_ADDR=f"127.0.0.1:{free_port()}")
    (tmp_path / "script.py").write_text(SCRIPT)
    box = {"env": env, "data_dir": tmp_path / "xdg" / "vcid", "script": tmp_path / "script.py"}
    yield box
    info = _daemon_file(box["data_dir"])
    if info is not None:
        vcid_cli(env, "stop")
        try:  # still there only if `vcid stop` is broken
            os.kill(info["pid"], 9)
        except ProcessLookupError:
            pass


def vcid_cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vcid", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_script(box, *args):
    return subprocess.Popen([sys.executable, str(box["script"]), *args], env=box["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


def _daemon_file(data_dir: Path):
    try:
        return json.loads((data_dir / "daemon.json").read_text())
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited daemon whose parent, here maybe
    a container's init, has not reaped it yet is gone)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_monitor_starts_a_daemon_a_rerun_appends_and_vcid_stop_ends_it(isolated):
    env = isolated["env"]
    out, err = finish(run_script(isolated, "digits", "1"))
    epochs = [int(line.split()[0]) for line in out.splitlines()]
    assert epochs == [0, 1]
    assert all(line.split()[1] == "120" for line in out.splitlines())
    started = [line for line in err.splitlines() if "started a local daemon" in line]
    assert len(started) == 1, err
    assert f"gRPC {env['VCID_ADDR']}" in started[0]
    assert f"web view http://{env['VCID_HTTP_ADDR']}/" in started[0]

    # The daemon outlived the script; its file says where it is.
    info = _daemon_file(isolated["data_dir"])
    assert info is not None and _alive(info["pid"])
    assert info["grpc_addr"] == env["VCID_ADDR"]
    assert (isolated["data_dir"] / "daemon.log").stat().st_size > 0

    # The same script again: the run resumes and appends epochs 2 and 3.
    out, err = finish(run_script(isolated, "digits", "2"))
    assert [int(line.split()[0]) for line in out.splitlines()] == [2, 3]
    assert "started a local daemon" not in err
    with vcid.Client(env["VCID_ADDR"]) as client:
        history = client.history("digits")
    assert [r.epoch for r in history] == [0, 1, 2, 3]
    assert all(r.vci is not None and 0 <= r.vci < 0.5 for r in history)

    stopped = vcid_cli(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the vcid daemon (pid {info['pid']}" in stopped.stdout
    assert not _alive(info["pid"])
    assert _daemon_file(isolated["data_dir"]) is None
    again = vcid_cli(env, "stop")
    assert again.returncode == 1
    assert "no vcid daemon runs for" in again.stderr

    # History survives in the user's data directory: the next start has it.
    out, err = finish(run_script(isolated, "digits", "3"))
    assert [int(line.split()[0]) for line in out.splitlines()] == [4, 5]
    assert "started a local daemon" in err


def test_racing_scripts_share_one_daemon(isolated):
    procs = [run_script(isolated, f"race-{i}", str(i)) for i in range(3)]
    errs = [finish(p)[1] for p in procs]
    started = [line for err in errs for line in err.splitlines()
               if "started a local daemon" in line]
    assert len(started) == 1, errs
    with vcid.Client(isolated["env"]["VCID_ADDR"]) as client:
        runs = sorted(r.run_id for r in client.runs())
    assert runs == ["race-0", "race-1", "race-2"]


def test_explicit_address_that_does_not_answer_fails_fast_with_the_hint(monkeypatch):
    monkeypatch.delenv("VCID_ADDR", raising=False)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for make in (lambda: vcid.Monitor("r", 3, 4, address=address),
                 lambda: vcid.Monitor("r", 3, 4, address=f"http://{address}"),
                 lambda: vcid.Client(address)):
        t0 = time.monotonic()
        with pytest.raises(vcid.VcidError) as info:
            make()
        assert time.monotonic() - t0 < 5.0
        assert info.value.code == "UNAVAILABLE"
        assert info.value.message.startswith(f"cannot reach the vcid server at http://{address}")
        assert "(is `vcid serve` running there?" in info.value.message


def test_a_listener_that_never_answers_grpc_fails_within_connect_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(vcid.VcidError) as info:
            vcid.Monitor("r", 3, 4, address=address, connect_timeout=1.0)
        assert time.monotonic() - t0 < 5.0
    assert "no gRPC answer within 1s" in info.value.message


def test_no_autostart_when_turned_off(isolated, monkeypatch):
    for key, value in isolated["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VCID_AUTOSTART", "0")
    with pytest.raises(vcid.VcidError, match="cannot reach the vcid server"):
        vcid.Monitor("r", 3, 4)
    assert _daemon_file(isolated["data_dir"]) is None


def test_vcid_addr_and_http_form_are_honoured(daemon, run_id, monkeypatch):
    monkeypatch.setenv("VCID_ADDR", f"http://{daemon.address}/")
    with vcid.Monitor(run_id, 3, 4) as mon:
        assert mon.address == f"http://{daemon.address}"
        mon.push(np.eye(4)[:3], np.arange(3))
        assert mon.close_epoch().samples == 3
    with pytest.raises(vcid.ArgumentError, match=r"address: expected 'host:port', "
                                                 r"'http://host:port' or 'https://host:port', "
                                                 r"received 'ftp://x:1'"):
        vcid.Monitor(run_id, 3, 4, address="ftp://x:1")


# ------------------------------------------------------ forgiving client


def test_client_reads_and_never_creates(daemon, run_id):
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        for _ in range(2):
            mon.push(np.eye(4)[:3] + np.arange(3)[:, None], np.arange(3))
            mon.close_epoch()
    with vcid.Client(daemon.address) as client:
        for call in (lambda: client.run("no-such-run"), lambda: client.history("no-such-run")):
            with pytest.raises(vcid.VcidError) as info:
                call()
            assert info.value.code == "NOT_FOUND"
            assert "no-such-run" in info.value.message
        names = [r.run_id for r in client.runs()]
        assert run_id in names and "no-such-run" not in names
        assert client.run(run_id).closed_epochs == 2
        history = client.history(run_id)
        assert [r.epoch for r in history] == [0, 1]
        row = history[1].to_dict()
        assert row["epoch"] == 1 and row["run_id"] == run_id and row["vci"] == history[1].vci
        assert json.loads(json.dumps(row)) == row
        frame = client.history_frame(run_id)
        assert list(frame["epoch"]) == [0, 1]
        assert list(frame.columns) == list(row)
        assert frame["vci"].tolist() == [r.vci for r in history]


def test_history_frame_without_pandas_says_what_to_do(daemon, run_id, monkeypatch):
    with vcid.Monitor(run_id, 3, 4, address=daemon.address):
        pass
    monkeypatch.setitem(sys.modules, "pandas", None)
    with vcid.Client(daemon.address) as client:
        with pytest.raises(ImportError, match=r"needs pandas \(pip install pandas\)"):
            client.history_frame(run_id)


def test_if_exists(daemon, run_id):
    x, y = np.eye(4)[:3] + 1.0, np.arange(3)
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        assert mon.start_epoch == 0
        for _ in range(2):
            mon.push(x, y)
            mon.close_epoch()
        assert mon.current_epoch() == 2
    with pytest.raises(vcid.VcidError) as info:
        vcid.Monitor(run_id, 3, 4, address=daemon.address, if_exists="fail")
    assert info.value.code == "ALREADY_EXISTS" and "if_exists='resume'" in info.value.context
    with pytest.raises(vcid.VcidError) as info:
        vcid.Monitor(run_id, 5, 4, address=daemon.address)  # resume, other shape
    assert info.value.code == "ALREADY_EXISTS" and "if_exists='replace'" in info.value.context

    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:  # resume
        assert (mon.start_epoch, mon.current_epoch(), mon.current_epoch("val")) == (2, 2, 2)
        with pytest.raises(vcid.VcidError) as info:
            mon.push(x, y, epoch=1)
        assert info.value.code == "FAILED_PRECONDITION"
        assert "received 1, which is closed" in info.value.message
        assert "push(..., epoch=None) continues at epoch 2" in info.value.context
        mon.push(x, y)
        assert mon.close_epoch().epoch == 2
        mon.push(x, y, split="val")
        assert mon.close_epoch(split="val").epoch == 2
        assert mon.current_epoch() == mon.current_epoch("val") == 3
        assert [r.epoch for r in mon.history()] == [0, 1, 2]

    with vcid.Monitor(run_id, 4, 4, address=daemon.address, if_exists="replace") as mon:
        assert mon.start_epoch == 0 and mon.num_classes == 4
        assert mon.history(split=None) == []
    with pytest.raises(vcid.ArgumentError, match=r"if_exists: expected one of \['resume', "
                                                 r"'replace', 'fail'\], received 'keep'"):
        vcid.Monitor(run_id, 3, 4, address=daemon.address, if_exists="keep")


def test_a_deferred_error_does_not_cost_the_batch_of_the_push_that_reports_it(daemon, run_id):
    bad = vcid.v1.vcid_pb2.FeatureBatch(run_id=run_id, epoch=0, rows=1, labels=[9],
                                        features=np.zeros(4, "<f4").tobytes())
    x, y = np.arange(12.0).reshape(3, 4), np.arange(3)
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        mon._enqueue_batch_unchecked(bad)
        deadline = time.monotonic() + 20
        while mon.pending and time.monotonic() < deadline:  # rejected and released
            time.sleep(0.02)
        time.sleep(0.2)
        with pytest.raises(vcid.VcidError) as info:
            mon.push(x, y)
        assert info.value.code == "INVALID_ARGUMENT"
        assert "its own batch, which is not lost: do not push it again" in info.value.context
        assert mon.flush().rows_applied == 3
        assert mon.close_epoch().samples == 3


def test_leaving_with_open_epochs_warns_naming_them(daemon, run_id):
    x, y = np.eye(4)[:3], np.arange(3)
    with pytest.warns(vcid.OpenEpochWarning,
                      match=r"epochs left open: train/penultimate epoch 0, val/penultimate "
                            r"epoch 0\. Their statistics stay in the daemon's memory"):
        with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
            mon.push(x, y)
            mon.push(x, y, split="val")
    with warnings.catch_warnings():
        warnings.simplefilter("error", vcid.OpenEpochWarning)
        with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
            assert mon.current_epoch() == 0  # epoch 0 is open, not closed: resumed there
            mon.push(x, y)
            assert mon.close_epoch().samples == 6
            assert mon.close_epoch(split="val").samples == 3


def test_reconnect_logging_is_one_line_per_outage_edge(fresh_daemon, run_id, caplog):
    x, y = np.eye(4)[:3], np.arange(3)
    with caplog.at_level("INFO", logger="vcid"):
        with vcid.Monitor(run_id, 3, 4, address=fresh_daemon.address,
                          reconnect_timeout=60.0) as mon:
            fresh_daemon.stop()
            mon.push(x, y)
            time.sleep(3.0)  # several retries at 0.05-2 s
            fresh_daemon.start()
            assert mon.flush(timeout=60).rows_applied == 3
            assert mon.reconnects >= 3
            assert mon.close_epoch().samples == 3
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"vcid: lost the connection to http://{fresh_daemon.address}")
    assert lines[1].startswith(f"vcid: reconnected to http://{fresh_daemon.address} after")


def test_backoff_is_jittered():
    from vcid._connection import jittered

    delays = [jittered(1.0) for _ in range(200)]
    assert all(0.5 <= d < 1.5 for d in delays)
    assert max(delays) - min(delays) > 0.5  # not in lockstep


def test_a_script_on_a_thread_pool_shares_one_monitor(daemon, run_id):
    """push() from several threads with epoch=None lands in one epoch."""
    x, y = np.eye(4)[:3] + 2.0, np.arange(3)
    with vcid.Monitor(run_id, 3, 4, address=daemon.address) as mon:
        threads = [threading.Thread(target=lambda: [mon.push(x, y) for _ in range(5)])
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert mon.close_epoch().samples == 60


def test_the_readme_snippet_works_on_a_fresh_machine(isolated):
    """The Python snippet at the top of README.md, run as a script twice in
    an empty HOME: a daemon is started, VCI falls, the re-run appends."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) <= 12
    script = isolated["script"].with_name("readme.py")
    script.write_text(snippet)
    runs, logs = [], []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], env=isolated["env"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs.append([line.split() for line in proc.stdout.splitlines()])
        logs.append(proc.stderr)
    assert [int(e) for e, _ in runs[0]] == [0, 1, 2, 3, 4]
    assert [int(e) for e, _ in runs[1]] == [5, 6, 7, 8, 9]
    vci = [float(v) for _, v in runs[0]]
    assert vci == sorted(vci, reverse=True) and vci[0] > 0.5 and vci[-1] < 0.15
    # The first run's log line gives the web view's address; the page is
    # there and its data holds every printed epoch.
    web = f"http://{isolated['env']['VCID_HTTP_ADDR']}/"
    assert f"web view {web}" in logs[0]
    with urllib.request.urlopen(web, timeout=10) as page:
        assert page.status == 200 and "<html" in page.read().decode().lower()
    with urllib.request.urlopen(web + "api/v1/runs/readme/history", timeout=10) as reply:
        history = json.load(reply)["results"]
    assert [r["epoch"] for r in history] == list(range(10))
    printed = [float(v) for run in runs for _, v in run]
    assert [round(r["vci"], 3) for r in history] == printed
