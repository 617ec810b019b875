"""report.html in a real headless Chromium, offline: it renders, and requests nothing remote.

Chromium runs with networking disabled (no DNS, a dead proxy) and writes a net log; the test
checks the log for requests to anything but the file itself, the HTML for external URLs, and
the screenshot for content (pixel variance). Outside CI, a machine without Chromium skips with
a message; in CI (``CI`` set) a missing Chromium fails the test (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _report_store import build_report_world

from cwa.stages.report import ReportConfig, run_report
from cwa.store import Store

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
            "headless_shell")
EXTERNAL_URL = re.compile(
    r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|wss?:|ftp:)?//"""
    r"""|url\(\s*["']?\s*(?:https?:)?//|@import|https?://""",
    re.IGNORECASE,
)


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = ("no headless Chromium found (install it with `apt-get install -y "
               "chromium-headless-shell`); the browser check of report.html did not run")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _offline_screenshot(browser: str, page: Path, tmp_path: Path) -> tuple[Path, str]:
    shot, netlog = tmp_path / "shot.png", tmp_path / "net.json"
    profile = tmp_path / "profile"
    profile.mkdir()
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}",
        # Networking off: every host name fails to resolve, every proxied request goes nowhere.
        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
        f"--log-net-log={netlog}", "--window-size=1200,1800", f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    return shot, netlog.read_text() if netlog.exists() else ""


def _remote_requests(netlog: str) -> set[str]:
    requested = set(re.findall(r'"url"\s*:\s*"([a-zA-Z][a-zA-Z0-9+.-]*:[^"]*)"', netlog))
    return {u for u in requested if not u.startswith(("file:", "data:", "chrome:", "about:"))}


@pytest.mark.slow
def test_net_log_sees_a_remote_request_when_a_page_makes_one(tmp_path: Path) -> None:
    browser = _browser()
    page = tmp_path / "remote.html"
    page.write_text('<html><body><p>x</p><img src="https://example.invalid/a.png"></body></html>')
    _, netlog = _offline_screenshot(browser, page, tmp_path)
    assert _remote_requests(netlog) == {"https://example.invalid/a.png"}


def test_external_url_pattern_catches_remote_references() -> None:
    for html in ('<img src="https://cdn.example/x.png">', "<link href='//cdn.example/a.css'>",
                 "<style>@import 'x.css'</style>", "body{background:url(http://x/y.png)}"):
        assert EXTERNAL_URL.search(html), html
    assert not EXTERNAL_URL.search('<img src="data:image/png;base64,AAAA">')


@pytest.mark.slow
def test_report_renders_offline_in_headless_chromium(store: Store, tmp_path: Path) -> None:
    browser = _browser()
    world = build_report_world(store)
    outcome = run_report(store, ReportConfig(runs=[world.perturb], formats=["png"]), mlflow=False)
    page = Path(outcome.value["report"])
    html = page.read_text()
    assert not EXTERNAL_URL.search(html), EXTERNAL_URL.search(html).group(0)
    assert html.count("data:image/png;base64,") == len(outcome.value["figures"]) >= 8

    shot, netlog = _offline_screenshot(browser, page, tmp_path)
    assert _remote_requests(netlog) == set()

    from PIL import Image

    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels.std() > 10.0  # a blank page has no variance
    assert len(np.unique(pixels)) > 50  # text and figures, not a flat fill
    # The top of the page (title and summary) is drawn, not only the body further down.
    assert pixels[:300].std() > 5.0
