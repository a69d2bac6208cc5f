"""Helpers of the deploy end-to-end suite: start and stop a real `vcid serve`
and a real Prometheus (Debian's `prometheus` package) on loopback ports with
temporary data directories, and talk to their HTTP APIs.

Owns process start/stop and small HTTP helpers. Must not assert anything
about vcid's behaviour (the test modules do that), and never talks to an
address other than 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULE_FILES = [PROM_DIR / "thresholds.yml", PROM_DIR / "alerts.yml"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vcid.json"
VCID_BIN = Path(os.environ.get("VCID_BIN", REPO / "target" / "release" / "vcid"))

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller
    retries if something else takes it before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; connection errors give status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def wait_until(what: str, probe: Callable[[], Optional[T]], timeout: float = 30.0,
               interval: float = 0.25) -> T:
    """Polls `probe` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last not in (None, False):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process whose output goes to a log file, shown on failure."""

    def __init__(self, name: str, argv: List[str], log_path: Path,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: apt-get install -y prometheus "
                    "(.ci/run does this)", pytrace=False)
    return path


@dataclass
class Daemon:
    process: Process
    grpc_addr: str
    http_addr: str
    data_dir: Path

    @property
    def metrics_url(self) -> str:
        return f"http://{self.http_addr}/metrics"


def start_daemon(vcid_bin: Path, workdir: Path) -> Daemon:
    """`vcid serve` on two free loopback ports, ready (GET /readyz = 200)."""
    data_dir = workdir / "data"
    last_log = ""
    for attempt in range(3):
        grpc_addr = f"127.0.0.1:{free_port()}"
        http_addr = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VCID_")}
        proc = Process("vcid", [str(vcid_bin), "serve", "--grpc-addr", grpc_addr,
                                "--http-addr", http_addr, "--data-dir", str(data_dir)],
                       workdir / f"vcid-{attempt}.log", env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.alive():
            if http_get(f"http://{http_addr}/readyz", timeout=1)[0] == 200:
                return Daemon(proc, grpc_addr, http_addr, data_dir)
            time.sleep(0.1)
        last_log = proc.log_tail()
        proc.stop(timeout=5)
    pytest.fail(f"vcid serve did not become ready; last log:\n{last_log}", pytrace=False)


@dataclass
class Prometheus:
    process: Process
    url: str
    config_path: Path

    def api(self, path: str, params: Optional[Dict[str, Any]] = None,
            timeout: float = 10.0) -> Dict[str, Any]:
        """GET /api/v1/<path>; returns the whole JSON answer (status included)."""
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout=timeout)
        if status == 0:
            raise AssertionError(f"Prometheus at {self.url} does not answer; log:\n"
                                 f"{self.process.log_tail()}")
        return json.loads(body)

    def query(self, expr: str, at: Optional[float] = None) -> List[Dict[str, Any]]:
        """Instant query; raises AssertionError naming the expression on error."""
        params: Dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = self.api("query", params)
        if answer.get("status") != "success":
            raise AssertionError(f"query failed: {expr!r}: {answer.get('errorType')}: "
                                 f"{answer.get('error')}")
        return answer["data"]["result"]

    def value(self, expr: str) -> Optional[float]:
        """The single sample of an instant query, or None when it is empty."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])


def write_prometheus_config(path: Path, scrape_configs: List[Dict[str, Any]]) -> None:
    """A config like deploy/prometheus/prometheus.yml, but with 1 s scrape and
    rule evaluation intervals and absolute paths to the shipped rule files."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": scrape_configs,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_prometheus(config_path: Path, workdir: Path) -> Prometheus:
    """Prometheus on a free loopback port with its own storage directory."""
    binary = require_tool("prometheus")
    last_log = ""
    for attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = Process("prometheus", [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ], workdir / f"prometheus-{attempt}.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.alive():
            if http_get(f"{url}/-/ready", timeout=1)[0] == 200:
                return Prometheus(proc, url, config_path)
            time.sleep(0.2)
        last_log = proc.log_tail()
        proc.stop(timeout=5)
    pytest.fail(f"prometheus did not become ready; last log:\n{last_log}", pytrace=False)


def k8s_simulated_job(daemon: Daemon) -> Dict[str, Any]:
    """The `vcid` job of deploy/prometheus/prometheus-kubernetes.yml with its
    relabelling rules unchanged, but fed by a static target that carries the
    meta labels Kubernetes pod discovery would give a pod of
    deploy/k8s/deployment.yaml (Debian's Prometheus is built without the
    Kubernetes discovery). The pod's annotations and labels are read from the
    manifest; only the port annotation is pointed at this test's daemon."""
    k8s_config = yaml.safe_load((PROM_DIR / "prometheus-kubernetes.yml").read_text())
    (job,) = [j for j in k8s_config["scrape_configs"] if j["job_name"] == "vcid"]
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["metadata"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")

    def meta(prefix: str, items: Dict[str, str]) -> Dict[str, str]:
        # Kubernetes SD turns every non-alphanumeric character into '_'.
        return {prefix + "".join(c if c.isalnum() else "_" for c in k): v
                for k, v in items.items()}

    labels = {
        **meta("__meta_kubernetes_pod_label_", pod["labels"]),
        **meta("__meta_kubernetes_pod_annotation_", pod["annotations"]),
        "__meta_kubernetes_pod_annotation_prometheus_io_port": daemon.http_addr.split(":")[1],
        "__meta_kubernetes_namespace": "ml-monitoring",
        "__meta_kubernetes_pod_name": "vcid-7d9f8b6c5-x2x9q",
        "__meta_kubernetes_pod_phase": "Running",
    }
    job = dict(job)
    del job["kubernetes_sd_configs"]
    job["job_name"] = "vcid-k8s-sim"
    # Pod discovery yields one target per declared container port, as
    # podIP:containerPort; the grpc port must be replaced by the annotation.
    job["static_configs"] = [{"targets": [f"127.0.0.1:{grpc_port}"], "labels": labels}]
    return job
