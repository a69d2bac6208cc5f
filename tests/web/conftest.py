"""Fixtures of the browser suite: the real release binary (`vcid serve` on free
loopback ports with a temporary data directory), fed through the Python client
over gRPC, and Debian's Chromium driven by Playwright.

Playwright never downloads a browser here: Chromium is launched from
/usr/bin/chromium (override with VCID_CHROMIUM) with a fresh profile.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python" / "src"))

from vcid.local import LocalDaemon  # noqa: E402

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


@pytest.fixture
def daemon(vcid_command, tmp_path):
    d = LocalDaemon(vcid_command, data_dir=tmp_path / "data")
    d.start()
    yield d
    d.close()


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
