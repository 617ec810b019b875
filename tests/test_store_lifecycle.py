"""Run lifecycle: success, failure, Ctrl-C in a real subprocess, concurrent writers, run ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
from _store_access import HOLD_LOCK_SCRIPT, store_rows

from cwa.errors import InvalidInput, RunNotFound, StoreLocked
from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.store import Store, list_runs, run_details
from cwa.store.ids import new_run_id

REPO = Path(__file__).resolve().parents[1]


def _tiny_result_table(store: Store) -> None:
    with store.write() as con:
        con.execute("CREATE TABLE IF NOT EXISTS demo_results (run_id VARCHAR, i INTEGER, v DOUBLE)")


def test_success_writes_results_metrics_artifacts(store: Store) -> None:
    _tiny_result_table(store)

    def compute(ctx):
        ctx.artifact_path("notes/summary.json", kind="data").write_text('{"ok": 1}')
        ctx.set_model("toy", "abc123", "cpu")
        return StageOutput(
            tables={"demo_results": [{"i": i, "v": i / 2} for i in range(5)]},
            metrics={"loss": 2.5},
        )

    outcome = execute_stage(store, StageRequest("demo", {"k": 3}, seed=7), compute)
    run = run_details(store, outcome.run_id)
    assert run.run.status == "succeeded"
    assert run.run.config == {"k": 3} and run.run.seed == 7
    assert run.run.model_fingerprint == "abc123" and run.run.device == "cpu"
    assert run.run.duration_s is not None and run.run.duration_s >= 0
    assert run.run.versions["duckdb"] == duckdb.__version__
    assert run.metrics == {"loss": 2.5}
    assert run.result_counts == {"demo_results": 5}
    assert [a["name"] for a in run.artifacts] == ["notes/summary.json"]
    assert store_rows(
        store, "SELECT sum(v) FROM demo_results WHERE run_id = ?", [outcome.run_id]
    ) == [(5.0,)]


def test_exception_marks_failed_and_writes_no_results(store: Store) -> None:
    _tiny_result_table(store)

    def compute(ctx):
        raise ValueError("boom at batch 3")

    with pytest.raises(ValueError):
        execute_stage(store, StageRequest("demo", {}), compute)
    (run,) = list_runs(store)
    assert run.status == "failed"
    assert run.error == "ValueError: boom at batch 3"
    assert store_rows(store, "SELECT count(*) FROM demo_results") == [(0,)]


def test_failure_while_writing_results_rolls_back_everything(store: Store) -> None:
    _tiny_result_table(store)

    def compute(ctx):
        # the second table does not exist: the first table's rows must not stay behind
        return StageOutput(
            tables={"demo_results": [{"i": 1, "v": 1.0}], "no_such_table": [{"x": 1}]},
            metrics={"m": 1.0},
        )

    with pytest.raises(duckdb.Error):
        execute_stage(store, StageRequest("demo", {}), compute)
    (run,) = list_runs(store)
    assert run.status == "failed"
    assert store_rows(store, "SELECT count(*) FROM demo_results") == [(0,)]
    assert store_rows(store, "SELECT count(*) FROM run_metrics") == [(0,)]


def test_unknown_parent_is_refused_before_anything_is_written(store: Store) -> None:
    with pytest.raises(RunNotFound):
        execute_stage(
            store,
            StageRequest("demo", {}, parents=[("01ABCDEF", "input")]),
            lambda ctx: StageOutput(),
        )
    assert list_runs(store) == []


_SLOW_STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cwa.lifecycle import StageOutput, StageRequest, execute_stage
    from cwa.store import Store

    store = Store.open(sys.argv[1])
    marker = Path(sys.argv[2])
    def compute(ctx):
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


def test_real_sigint_marks_run_interrupted(tmp_path: Path, store: Store) -> None:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_STAGE)
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store.path), str(marker)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "stage never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    run_id = marker.read_text()
    run = run_details(store, run_id).run
    assert run.status == "interrupted"
    assert "Ctrl-C" in run.error
    assert run.finished_at is not None
    assert store_rows(store, "SELECT count(*) FROM run_metrics") == [(0,)]


def test_killed_process_is_marked_interrupted_on_next_write(tmp_path: Path, store: Store) -> None:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_STAGE)
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(script), str(store.path), str(marker)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    execute_stage(store, StageRequest("next", {}), lambda ctx: StageOutput())
    run = run_details(store, marker.read_text()).run
    assert run.status == "interrupted" and "ended without finishing" in run.error


def _hold_lock(tmp_path: Path, store: Store, seconds: float) -> subprocess.Popen:
    script = tmp_path / "hold.py"
    script.write_text(HOLD_LOCK_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store.db_path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_waits_for_the_lock_then_succeeds(tmp_path: Path, store: Store) -> None:
    holder = _hold_lock(tmp_path, store, 1.5)
    started = time.monotonic()
    outcome = execute_stage(store, StageRequest("demo", {}), lambda ctx: StageOutput())
    assert time.monotonic() - started >= 1.0  # it really waited
    holder.wait(timeout=30)
    assert run_details(store, outcome.run_id).run.status == "succeeded"


def test_writer_gives_up_with_a_message_naming_the_holder(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    holder = _hold_lock(tmp_path, store, 8)
    try:
        monkeypatch.setenv("CWA_LOCK_TIMEOUT", "1")
        with pytest.raises(StoreLocked, match=rf"locked by .*PID {holder.pid}"):
            execute_stage(store, StageRequest("demo", {}), lambda ctx: StageOutput())
        result = cli("--store", str(store.path), "runs", "list")
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: store ") and f"PID {holder.pid}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert list_runs(store) == []


def test_two_processes_writing_concurrently_both_succeed(tmp_path: Path, store: Store) -> None:
    script = tmp_path / "many.py"
    script.write_text(
        textwrap.dedent(
            """
        import sys
        from cwa.lifecycle import StageOutput, StageRequest, execute_stage
        from cwa.store import Store
        store = Store.open(sys.argv[1])
        for i in range(8):
            execute_stage(store, StageRequest("w" + sys.argv[2], {"i": i}),
                          lambda ctx: StageOutput(metrics={"i": float(i)}))
        """
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store.path), str(n)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    runs = list_runs(store, limit=None)
    assert len(runs) == 16 and {r.status for r in runs} == {"succeeded"}


def test_run_ids_are_time_sortable_and_unique() -> None:
    ids = [new_run_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


def test_prefix_latest_and_stage_resolution(store: Store) -> None:
    a = execute_stage(store, StageRequest("score", {}), lambda ctx: StageOutput()).run_id
    b = execute_stage(
        store, StageRequest("rank", {}, parents=[(a, "scores")]), lambda ctx: StageOutput()
    ).run_id
    from cwa.store import resolve_run_id

    with store.read() as con:
        assert resolve_run_id(con, "latest") == b
        assert resolve_run_id(con, "latest:score") == a
        assert resolve_run_id(con, a.lower()) == a
        assert resolve_run_id(con, a[:-3]) == a or a[:-3] == b[:-3]
        with pytest.raises(InvalidInput, match="is a score run, but a rank run is needed"):
            resolve_run_id(con, a, stage="rank")
    details = run_details(store, a)
    assert [c[0] for c in details.children] == [b]
    assert run_details(store, b).run.parents == [(a, "scores")]
    assert json.loads(json.dumps(details.to_dict()))["children"][0]["stage"] == "rank"
    assert os.path.isdir(store.artifacts_root)
