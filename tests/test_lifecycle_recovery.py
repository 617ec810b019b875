"""Computed results are never lost: a failing final write keeps them for `cwa runs recover`;
SIGTERM marks a run interrupted; a killed run's partial artifacts are removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _store_access import HOLD_LOCK_SCRIPT, store_rows

from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.store import Store
from cwa.store.runs import run_details

REPO = Path(__file__).resolve().parents[1]


_WRITE_BLOCKED = textwrap.dedent(
    """
    import subprocess, sys
    from cwa.lifecycle import StageOutput, StageRequest, execute_stage
    from cwa.store import Store

    store = Store.open(sys.argv[1])
    rows = [{"parameter": f"p{i}", "layer": i, "component": "mlp_up", "numel": 10 * (i + 1),
             "mean": i / 3, "max": float(i)} for i in range(5)]

    def compute(ctx):
        ctx.artifact_path("scores.bin", kind="scores").write_bytes(b"hours of scoring")
        # Someone else grabs the store while we compute and keeps it past our lock timeout.
        proc = subprocess.Popen([sys.executable, sys.argv[2], str(store.db_path), "5"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        return StageOutput(tables={"tensor_stats": rows}, metrics={"loss": 2.5})

    try:
        execute_stage(store, StageRequest("score", {"metric": "x"}), compute)
    except Exception as exc:
        print(type(exc).__name__, flush=True)
        sys.exit(1)
    """
)


def test_failed_final_write_keeps_results_and_recover_writes_them(
    tmp_path: Path, store: Store, cli
) -> None:
    """The store stays locked past the timeout while the results are written (another process
    holds it): the stage process fails, the artifacts stay, and `cwa runs recover` stores
    exactly the computed rows once the store is free."""
    (tmp_path / "hold.py").write_text(HOLD_LOCK_SCRIPT)
    (tmp_path / "stage.py").write_text(_WRITE_BLOCKED)
    env = {**os.environ, "CWA_LOCK_TIMEOUT": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "stage.py"), str(store.path), str(tmp_path / "hold.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout.strip() == "StoreLocked", proc.stderr
    time.sleep(5)  # the holder lets go
    ((run_id, status, error),) = store_rows(store, "SELECT run_id, status, error FROM runs")
    folder = store.artifacts_dir(run_id)
    assert (folder / "scores.bin").read_bytes() == b"hours of scoring"  # artifacts survive
    assert (folder / ".pending" / "state.json").is_file()
    assert store_rows(store, "SELECT count(*) FROM tensor_stats") == [(0,)]
    # Marking the run failed needed the lock too, so it may still read 'running' (its process
    # is gone); either way it is recoverable.
    assert status == "running" or (status == "failed" and f"cwa runs recover {run_id}" in error)

    result = cli("--store", str(store.path), "--json", "runs", "recover", run_id[:12])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["runs"][0]["status"] == "succeeded"
    run = run_details(store, run_id).run
    assert run.status == "succeeded" and run.error is None
    stored = store_rows(store, "SELECT parameter, layer, numel, mean, max FROM tensor_stats "
                        "WHERE run_id = ? ORDER BY parameter", [run_id])  # fmt: skip
    expected = [(f"p{i}", i, 10 * (i + 1), i / 3, float(i)) for i in range(5)]
    assert stored == expected
    metrics = store_rows(store, "SELECT name, value FROM run_metrics WHERE run_id = ?", [run_id])
    assert metrics == [("loss", 2.5)]
    artifacts = store_rows(store, "SELECT name, kind FROM run_artifacts WHERE run_id = ?", [run_id])
    assert artifacts == [("scores.bin", "scores")]  # the pending folder itself is not listed
    assert not (folder / ".pending").exists()
    again = cli("--store", str(store.path), "runs", "recover", run_id)
    assert again.exit_code == 1 and "already succeeded" in again.stderr


def test_next_registration_keeps_pending_results_of_a_stale_run(tmp_path: Path, store: Store):
    """A stale run (process gone) holding pending results keeps them when marked interrupted."""
    from cwa.recovery import PendingResults, has_pending, save_pending

    proc, marker = _start_slow(tmp_path, store)
    run_id = marker.read_text()
    save_pending(store, PendingResults(run_id, {}, {"m": 1.0}, {}, None, None, None, 1.0))
    proc.kill()
    proc.wait(timeout=30)
    execute_stage(store, StageRequest("next", {}), lambda ctx: StageOutput())
    assert run_details(store, run_id).run.status == "interrupted"
    assert has_pending(store, run_id)


def test_recover_refuses_a_run_without_pending_results(store: Store, cli) -> None:
    def boom(ctx):
        raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError):
        execute_stage(store, StageRequest("score", {}), boom)
    ((run_id,),) = store_rows(store, "SELECT run_id FROM runs")
    result = cli("--store", str(store.path), "runs", "recover", run_id)
    assert result.exit_code == 1 and "nothing to recover" in result.stderr


_SLOW_STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cwa.lifecycle import StageOutput, StageRequest, execute_stage
    from cwa.store import Store

    store = Store.open(sys.argv[1])
    marker = Path(sys.argv[2])
    def compute(ctx):
        ctx.artifact_path("partial.safetensors").write_bytes(b"half")
        marker.write_text(ctx.run_id)
        for _ in range(600):
            time.sleep(0.05)
        return StageOutput(metrics={"never": 1.0})
    try:
        execute_stage(store, StageRequest("slow", {}), compute)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def _start_slow(tmp_path: Path, store: Store) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_STAGE)
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(script), str(store.path), str(marker)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "stage never started"
        time.sleep(0.05)
    return proc, marker


def test_sigterm_marks_the_run_interrupted(tmp_path: Path, store: Store) -> None:
    proc, marker = _start_slow(tmp_path, store)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    run = run_details(store, marker.read_text()).run
    assert run.status == "interrupted" and "SIGTERM" in run.error
    assert run.finished_at is not None
    assert not store.artifacts_dir(run.run_id).exists()  # partial artifacts removed


def test_killed_run_marked_interrupted_loses_its_partial_artifacts(
    tmp_path: Path, store: Store
) -> None:
    proc, marker = _start_slow(tmp_path, store)
    run_id = marker.read_text()
    assert (store.artifacts_dir(run_id) / "partial.safetensors").is_file()
    proc.kill()
    proc.wait(timeout=30)
    execute_stage(store, StageRequest("next", {}), lambda ctx: StageOutput())
    assert run_details(store, run_id).run.status == "interrupted"
    assert not store.artifacts_dir(run_id).exists()
