"""Fixtures of the deploy end-to-end suite: one `vcid serve` and one
Prometheus per test module, on loopback ports with temporary directories,
stopped in the fixtures' teardown (see e2e_stack for the mechanics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_stack import (
    VCID_BIN,
    Daemon,
    Prometheus,
    k8s_simulated_job,
    start_daemon,
    start_prometheus,
    write_prometheus_config,
)


@pytest.fixture(scope="session")
def vcid_bin() -> Path:
    if not VCID_BIN.is_file():
        pytest.fail(f"{VCID_BIN} does not exist: run `cargo build --release` first",
                    pytrace=False)
    return VCID_BIN


@pytest.fixture(scope="module")
def daemon(vcid_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    d = start_daemon(vcid_bin, tmp_path_factory.mktemp("vcid"))
    yield d
    d.process.stop()


@pytest.fixture(scope="module")
def prometheus(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory):
    """Prometheus scraping the module's daemon every second as job "vcid"
    (plus the simulated Kubernetes job), with the shipped rule files."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config_path = workdir / "prometheus.yml"
    write_prometheus_config(config_path, [
        {"job_name": "vcid", "static_configs": [{"targets": [daemon.http_addr]}]},
        k8s_simulated_job(daemon),
    ])
    p: Prometheus = start_prometheus(config_path, workdir)
    yield p
    p.process.stop()
