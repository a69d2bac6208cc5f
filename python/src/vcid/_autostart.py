"""Starting a local daemon when a ``Monitor`` or ``Client`` was given no
address and nothing answers at ``$VCID_ADDR`` (or ``127.0.0.1:50051``).

Owns the data directory choice (``$VCID_DATA_DIR``, else the per-user one
the crate names: ``$XDG_DATA_HOME/vcid`` or ``~/.local/share/vcid``), the
start lock that lets only one of several racing processes start it, the
child process (``python -m vcid serve`` from this installation, in a session
of its own so it outlives the script), waiting until it is ready, and the
one log line that says where it is. ``vcid stop`` ends it. Must not talk
gRPC: a TCP connect is how it tells that something listens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from . import _native
from ._errors import VcidError

log = logging.getLogger("vcid")

#: Where the HTTP listener (web view, /metrics) goes unless ``$VCID_HTTP_ADDR`` says
#: otherwise (a free port is taken when it is busy).
DEFAULT_HTTP_ADDRESS = "127.0.0.1:9464"
#: Longest wait for a started daemon to answer (it restores its history
#: first).
READY_TIMEOUT = 60.0

# Started daemons, kept referenced: they are meant to outlive this process.
_STARTED: List[subprocess.Popen] = []


def data_directory() -> Path:
    """``$VCID_DATA_DIR``, else the per-user data directory."""
    env = os.environ.get("VCID_DATA_DIR", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    found = _native.user_data_dir()
    if found is None:
        raise VcidError("FAILED_PRECONDITION",
                        "no data directory for a local vcid daemon: set VCID_DATA_DIR "
                        "(neither XDG_DATA_HOME nor HOME is set)")
    return Path(found)


def answers(target: str, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def ensure_local_daemon(target: str) -> None:
    """Make sure a daemon answers at ``target`` (a loopback ``host:port``),
    starting one when nothing does and ``$VCID_AUTOSTART`` is not ``0``."""
    if answers(target) or os.environ.get("VCID_AUTOSTART", "").strip() == "0":
        return
    data_dir = data_directory()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        # Another process may have started it while this one waited.
        if answers(target):
            return
        running = _read_daemon_file(data_dir)
        if running is not None and _alive(running.get("pid")):
            raise VcidError(
                "UNAVAILABLE",
                f"nothing answers at {target}, and the vcid daemon that serves {data_dir} "
                f"(pid {running['pid']}) listens at {running.get('grpc_addr')}: set "
                f"VCID_ADDR={running.get('grpc_addr')}, or end it with `vcid stop` first",
            )
        proc = _spawn(target, data_dir)
        info = _wait_ready(proc, target, data_dir)
    log.warning(
        "vcid: started a local daemon (pid %s): gRPC %s, web view http://%s/; data and log "
        "in %s; `vcid stop` ends it", info["pid"], info["grpc_addr"], info["http_addr"],
        data_dir)


@contextlib.contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``<data_dir>/start.lock`` (released on exit, even
    when the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the daemon's own database lock remains
        yield
        return
    with open(data_dir / "start.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _serve_address(target: str) -> str:
    """``target`` as a socket address for ``vcid serve --grpc-addr``."""
    host, _, port = target.rpartition(":")
    return f"127.0.0.1:{port}" if host == "localhost" else target


def _http_address() -> str:
    env = os.environ.get("VCID_HTTP_ADDR", "").strip()
    if env:
        return env
    host, _, port = DEFAULT_HTTP_ADDRESS.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            return f"{host}:0"  # busy: any free port (daemon.json tells which)
    return DEFAULT_HTTP_ADDRESS


def _spawn(target: str, data_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vcid", "serve", "--grpc-addr", _serve_address(target),
               "--http-addr", _http_address(), "--data-dir", str(data_dir)]
    with open(data_dir / "daemon.log", "ab") as logfile:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, cwd=str(data_dir),
                                start_new_session=True, close_fds=True)
    _STARTED.append(proc)
    return proc


def _wait_ready(proc: subprocess.Popen, target: str, data_dir: Path) -> Dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            raise VcidError(
                "UNAVAILABLE",
                f"the local vcid daemon exited with status {code} before it was ready; "
                f"the end of its log ({data_dir / 'daemon.log'}):\n{_log_tail(data_dir)}",
            )
        info = _read_daemon_file(data_dir)
        if info is not None and info.get("pid") == proc.pid and answers(target):
            return info
        if time.monotonic() > deadline:
            raise VcidError(
                "UNAVAILABLE",
                f"the local vcid daemon (pid {proc.pid}) did not answer at {target} within "
                f"{READY_TIMEOUT:g}s; the end of its log:\n{_log_tail(data_dir)}",
            )
        time.sleep(0.05)


def _read_daemon_file(data_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((data_dir / "daemon.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(data_dir: Path, lines: int = 20) -> str:
    try:
        text = (data_dir / "daemon.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
