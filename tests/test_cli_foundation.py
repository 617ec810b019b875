"""CLI spine: runs/sql/db commands, output conventions, bad input, lazy imports."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.store import Store

HEAVY = ("torch", "transformers", "datasets", "mlflow", "sklearn", "matplotlib")


def _fingerprint(path: Path) -> dict[str, str]:
    """Hash of every file in a store directory (to prove commands changed nothing)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def populated(store: Store) -> dict[str, str]:
    ids = {}
    ids["score"] = execute_stage(
        store,
        StageRequest("score", {"metric": "magnitude"}, seed=0, model_ref="toy"),
        lambda ctx: StageOutput(metrics={"loss": 1.25}),
    ).run_id
    ids["rank"] = execute_stage(
        store,
        StageRequest("rank", {"k": 10}, parents=[(ids["score"], "scores")]),
        lambda ctx: StageOutput(),
    ).run_id
    ids["other"] = execute_stage(
        store, StageRequest("score", {}, experiment="exp2"), lambda ctx: StageOutput()
    ).run_id
    return ids


def _one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_runs_list_table_and_json(cli, populated) -> None:
    result = cli("runs", "list")
    assert result.exit_code == 0, result.stderr
    for run_id in populated.values():
        assert run_id in result.stdout
    as_json = json.loads(cli("--json", "runs", "list", "--stage", "score").stdout)
    assert {r["run_id"] for r in as_json} == {populated["score"], populated["other"]}
    only = json.loads(cli("--json", "runs", "list", "--experiment", "exp2").stdout)
    assert [r["run_id"] for r in only] == [populated["other"]]
    limited = json.loads(cli("--json", "runs", "list", "-n", "1").stdout)
    assert [r["run_id"] for r in limited] == [populated["other"]]  # newest first


def test_runs_show_with_prefix_and_latest(cli, populated) -> None:
    shown = json.loads(cli("--json", "runs", "show", populated["rank"][:20]).stdout)
    assert shown["run"]["run_id"] == populated["rank"]
    assert shown["run"]["parents"] == [{"run_id": populated["score"], "role": "scores"}]
    latest = json.loads(cli("--json", "runs", "show", "latest:rank").stdout)
    assert latest["run"]["run_id"] == populated["rank"]
    human = cli("runs", "show", populated["score"])
    assert human.exit_code == 0 and "lineage" in human.stdout and "loss" in human.stdout


def test_runs_delete_refuses_children_then_recursive(cli, populated, store: Store) -> None:
    before = _fingerprint(store.path)
    line = _one_error_line(cli("runs", "delete", populated["score"], "--yes"))
    assert "dependent run" in line and "--recursive" in line
    assert _fingerprint(store.path) == before
    result = cli("--json", "runs", "delete", populated["score"], "--recursive", "--yes")
    assert result.exit_code == 0, result.stderr
    assert set(json.loads(result.stdout)["deleted"]) == {populated["score"], populated["rank"]}
    remaining = json.loads(cli("--json", "runs", "list").stdout)
    assert [r["run_id"] for r in remaining] == [populated["other"]]


def test_sql_formats(cli, populated, tmp_path: Path) -> None:
    query = "SELECT run_id, stage FROM runs ORDER BY run_id"
    as_json = json.loads(cli("sql", query, "--format", "json").stdout)
    assert [r["run_id"] for r in as_json] == sorted(populated.values())
    csv = cli("sql", query, "-f", "csv").stdout.splitlines()
    assert csv[0] == "run_id,stage" and len(csv) == 4
    out = tmp_path / "r.parquet"
    assert cli("sql", query, "-f", "parquet", "-o", str(out)).exit_code == 0
    assert pl.read_parquet(out)["stage"].to_list() == ["score", "rank", "score"]
    table = cli("sql", "SELECT count(*) AS n FROM runs")
    assert table.exit_code == 0 and "3" in table.stdout
    lineage = json.loads(cli("--json", "sql", "SELECT * FROM run_lineage").stdout)
    assert lineage == [
        {"run_id": populated["rank"], "ancestor_run_id": populated["score"], "depth": 1}
    ]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("runs", "show", "ZZZZZZZZ"), "no run matches"),
        (("runs", "show", "0"), "matches several runs"),
        (("sql", "DELETE FROM runs"), "read-only"),
        (("sql", "INSERT INTO run_metrics VALUES ('a', 'b', 1)"), "read-only"),
        (("sql", "DROP TABLE runs"), "read-only"),
        (("sql", "COPY runs TO 'leak.csv'"), "refused a COPY statement"),
        (("sql", "ATTACH 'other.duckdb' AS o"), "read-only"),
        (("sql", "SELECT * FROM nope"), "SQL error"),
        (("sql", "SELECT 1", "-f", "parquet"), "needs --output"),
        (("runs", "list", "--status", "weird"), "unknown status"),
    ],
)
def test_bad_input_is_one_error_line_and_changes_nothing(cli, populated, store, args, expected):
    before = _fingerprint(store.path)
    line = _one_error_line(cli(*args))
    assert expected in line
    assert _fingerprint(store.path) == before


def test_missing_store_for_read_only_commands(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (("runs", "list"), ("sql", "SELECT 1"), ("db", "status"), ("runs", "show", "x")):
        line = _one_error_line(cli("--store", str(missing), *args))
        assert "no store at" in line
    assert not missing.exists()


def test_non_duckdb_file_as_store(cli, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "cwa.duckdb").write_text("this is not a database\n" * 100)
    before = _fingerprint(bogus)
    for args in (("runs", "list"), ("db", "migrate"), ("sql", "SELECT 1")):
        line = _one_error_line(cli("--store", str(bogus), *args))
        assert "cannot open" in line and "DuckDB" in line
    assert _fingerprint(bogus) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in _one_error_line(cli("--store", str(a_file), "db", "migrate"))


def test_db_status_and_migrate(cli, tmp_path: Path) -> None:
    path = tmp_path / "fresh"
    result = cli("--json", "--store", str(path), "db", "migrate")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["applied"][0] == "0001_runs.sql"
    status = json.loads(cli("--json", "--store", str(path), "db", "status").stdout)
    assert status["pending"] == [] and status["schema_version"] >= 1 and status["runs"] == 0
    again = cli("--json", "--store", str(path), "db", "migrate")
    assert json.loads(again.stdout)["applied"] == []


def test_usage_error_exit_code_two(cli) -> None:
    result = cli("runs", "list", "--limit", "notanumber")
    assert result.exit_code == 2


def test_debug_env_reraises(cli, monkeypatch, tmp_path: Path) -> None:
    from cwa.errors import StoreNotFound

    monkeypatch.setenv("CWA_DEBUG", "1")
    result = cli("--store", str(tmp_path / "none"), "runs", "list")
    assert isinstance(result.exception, StoreNotFound)


def test_version(cli) -> None:
    from cwa import __version__

    assert cli("--version").stdout.strip() == f"cwa {__version__}"


def test_light_commands_import_no_heavy_library(tmp_path: Path, populated, store) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from cwa_cli.main import app
        runner = CliRunner()
        for args in (["--help"], ["runs", "list"], ["sql", "SELECT count(*) FROM runs"],
                     ["runs", "show", "latest"], ["db", "status"]):
            result = runner.invoke(app, ["--store", {str(store.path)!r}, *args])
            assert result.exit_code == 0, (args, result.output)
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(",".join(heavy))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy imports at startup: {proc.stdout}"


def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cwa_cli.main", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "runs" in proc.stdout
