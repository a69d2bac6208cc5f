"""Fixtures: the real daemon (the installed package's ``vcid serve``) started
on ephemeral loopback ports with a temporary data directory (no mocks), and
unique run ids. Puts the
repository's numpy reference (``tests/reference/reference.py``, shared with
the Rust fixtures) on the import path as ``reference``."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from vcid.local import LocalDaemon, find_vcid

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "reference"))


@pytest.fixture(scope="session")
def vcid_command():
    """The installed package's own ``vcid`` command (``python -m vcid``:
    the daemon inside the wheel), or ``$VCID_BIN`` if set."""
    return find_vcid()


@pytest.fixture(scope="session")
def daemon(vcid_command, tmp_path_factory):
    d = LocalDaemon(vcid_command, data_dir=tmp_path_factory.mktemp("vcid-data"))
    d.start()
    yield d
    d.close()


@pytest.fixture
def fresh_daemon(vcid_command, tmp_path):
    """A daemon of the test's own (for restarts)."""
    d = LocalDaemon(vcid_command, data_dir=tmp_path / "data")
    d.start()
    yield d
    d.close()


@pytest.fixture
def run_id(request):
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in request.node.name)
    return f"{name[:80]}-{uuid.uuid4().hex[:8]}"
