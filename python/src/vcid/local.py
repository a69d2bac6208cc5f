"""``vcid.local.LocalDaemon``: start a throw-away ``vcid serve`` on loopback.

For examples, notebooks, tests and benchmarks: picks free ephemeral ports on
127.0.0.1, uses a temporary data directory unless given one, waits until the
daemon answers ``/readyz``, and stops it with SIGTERM (graceful: in-flight
batches finish and open epochs are checkpointed). Owns only the child
process; must not talk gRPC beyond waiting for readiness.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Union


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_vcid() -> List[str]:
    """The command that runs ``vcid``: ``$VCID_BIN`` if set (e.g. a binary
    from ``cargo build --release``), else this package's own command
    (``python -m vcid``)."""
    env = os.environ.get("VCID_BIN")
    if env:
        return [env]
    return [sys.executable, "-m", "vcid"]


class LocalDaemon:
    """A ``vcid serve`` child process on 127.0.0.1.

    ``with LocalDaemon(find_vcid()) as d: Monitor(run, k, d, address=d.address)``.
    ``stop()`` then ``start()`` restarts it on the same ports and data
    directory (what a crash-and-restart looks like to a client).
    """

    def __init__(
        self,
        command: Sequence[str],
        data_dir: Optional[Union[str, Path]] = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 60.0,
        tls_ca: Optional[Union[str, Path]] = None,
    ) -> None:
        self.command = list(command)
        # With TLS (``--tls-cert`` in ``extra_args``): the CA file that
        # readiness checks over https:// trust.
        self.tls_ca = tls_ca
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vcid-data-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.grpc_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.log_path = self.data_dir / "daemon.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def argv(self) -> List[str]:
        return self.command + [
            "serve",
            "--grpc-addr", self.address,
            "--http-addr", self.http_address,
            "--data-dir", str(self.data_dir),
        ] + self.extra_args

    def start(self) -> "LocalDaemon":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + self.ready_timeout
        scheme = "https" if self.tls_ca is not None else "http"
        url = f"{scheme}://{self.http_address}/readyz"
        context = (ssl.create_default_context(cafile=str(self.tls_ca))
                   if self.tls_ca is not None else None)
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vcid serve exited with status {code} before it was ready; "
                    f"its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"vcid serve: expected {url} to answer 200 within {self.ready_timeout}s, "
                    f"received nothing; its log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM (graceful shutdown and checkpoint); SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LocalDaemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
