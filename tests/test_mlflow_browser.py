"""The MLflow UI as a researcher sees it: a real `mlflow server` and headless Chromium.

Starts `mlflow server` on a loopback port against a demo-like store (in its own process group),
loads the experiment's runs page and a run page in headless Chromium (`--dump-dom`), checks the
cwa runs, their stage names, their datasets and a metric in the rendered page, takes a
screenshot, then ends the whole process group (uvicorn workers and job runners included) and
checks that no process of it is left. Skipped, with a message, where Chromium is missing
(CI installs it: see .ci/run). ``CWA_MLFLOW_SCREENSHOT=docs/mlflow-runs.png`` keeps the picture.
"""
# ruff: noqa: F811  (pytest fixtures imported from _demo_store are used as arguments)

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from _demo_store import demo_store, demo_template  # noqa: F401

from cwa.store import Store

pytestmark = pytest.mark.slow

_BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _chromium(browser: str, url: str, *extra: str, budget_ms: int = 20000) -> str:
    with tempfile.TemporaryDirectory() as profile:
        args = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    return done.stdout


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _rendered(browser: str, url: str, needles: list[str]) -> str:
    """The page's text once every needle shows (the UI is a JS app: retry with more time)."""
    text = ""
    for budget in (20000, 40000, 80000):
        text = _visible_text(_chromium(browser, url, "--dump-dom", budget_ms=budget))
        if all(n in text for n in needles):
            break
    return text


def _live_members(pgid: int) -> list[str]:
    """Processes of the group that still run (zombies are dead and hold nothing)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            alive.append(stat.parent.name)
    return alive


def _stop_group(proc: subprocess.Popen) -> None:
    pgid = proc.pid  # start_new_session: the server leads its own process group
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _live_members(pgid):
            proc.poll()  # reap the leader as soon as it ends
            time.sleep(0.2)
        if not _live_members(pgid):
            break
    proc.wait(timeout=30)


def test_mlflow_ui_shows_the_cwa_runs(demo_store: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip(
            "Chromium is not installed (apt-get install -y chromium or chromium-headless-shell); "
            "CI installs it in .ci/run"
        )
    from cwa.mlflow_mirror import tracking_uri
    from cwa.mlflow_sync import experiment_url, sync_runs

    store = Store.open(demo_store)
    mirrored = dict(sync_runs(store))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(store))
    runs = {
        r.data.tags["cwa.stage"]: r
        for r in client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    }
    assert set(runs) == {"score", "rank", "evaluate", "perturb"} and len(mirrored) == 4

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri(store),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    try:
        _wait_ready(f"{base}/health", proc, log)
        url = experiment_url(store, "demo", base)
        assert url.endswith("/runs?workflowType=machine_learning")
        names = [r.info.run_name for r in runs.values()]
        text = _rendered(browser, url, names)
        for stage, run in runs.items():
            assert run.info.run_name in text, (
                f"{stage} run missing from the runs page: {text[:2000]}"
            )
            assert run.info.run_name.startswith(stage)
        assert "toy (" in text and "calibration" in text  # the score run's dataset input
        assert "evaluation" in text  # the evaluate/perturb runs' task inputs
        assert "Traces" not in text.split("Run Name")[-1][:200]  # the runs table, not traces

        score = runs["score"]
        loss = score.data.metrics["calibration_loss"]
        run_url = f"{base}/#/experiments/{score.info.experiment_id}/runs/{score.info.run_id}"
        run_text = _rendered(
            browser, run_url + "?workflowType=machine_learning", ["calibration_loss"]
        )
        assert re.search(rf"calibration_loss {re.escape(str(loss))[:10]}", run_text), run_text[
            :3000
        ]
        assert "mass_share.component.embed" in run_text

        shot = tmp_path / "mlflow-runs.png"
        _chromium(
            browser, url, f"--screenshot={shot}", "--window-size=1500,720", "--hide-scrollbars"
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        keep = os.environ.get("CWA_MLFLOW_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)
    finally:
        _stop_group(proc)
    assert proc.returncode is not None
    assert _live_members(proc.pid) == [], "mlflow server processes left behind"
