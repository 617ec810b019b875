"""cwa runs compare / tag / export, cwa db import / gc: behaviour, bad input, round trip."""
# ruff: noqa: F811  (pytest fixtures imported from _demo_store are used as arguments)

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from _cli_checks import assert_one_line_error
from _demo_store import demo_store, demo_template  # noqa: F401
from _store_access import store_rows
from test_sql_files import EXAMPLES, same_rows

from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.store import Store


def _snapshot(store: Path) -> list[tuple]:
    return store_rows(store, "SELECT run_id, status FROM runs ORDER BY run_id")


def test_compare_marks_differences(cli, store: Store) -> None:
    a = execute_stage(
        store,
        StageRequest("score", {"a": 1, "b": {"c": 2}}, seed=0),
        lambda ctx: StageOutput(metrics={"loss": 1.0, "same": 5.0}),
    )
    b = execute_stage(
        store,
        StageRequest("score", {"a": 1, "b": {"c": 3}, "d": 4}, seed=1),
        lambda ctx: StageOutput(metrics={"loss": 2.0, "same": 5.0}),
    )
    result = cli("--json", "runs", "compare", a.run_id, b.run_id)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["run_ids"] == [a.run_id, b.run_id]
    rows = {(r["section"], r["key"]): (r["values"], r["differs"]) for r in data["rows"]}
    assert rows[("config", "a")] == ([1, 1], False)
    assert rows[("config", "b.c")] == ([2, 3], True)
    assert rows[("config", "d")] == ([None, 4], True)
    assert rows[("metric", "loss")] == ([1.0, 2.0], True)
    assert rows[("metric", "same")] == ([5.0, 5.0], False)
    assert rows[("run", "seed")] == ([0, 1], True)
    assert rows[("run", "stage")] == (["score", "score"], False)
    table = cli("runs", "compare", a.run_id[:12], b.run_id[:12])
    assert table.exit_code == 0
    marked = [line for line in table.stdout.splitlines() if "b.c" in line]
    assert len(marked) == 1 and "*" in marked[0]
    assert not [line for line in table.stdout.splitlines() if "│ same" in line]  # hidden: agrees
    everything = cli("runs", "compare", a.run_id, b.run_id, "--all")
    assert "same" in everything.stdout


def test_compare_bad_input(cli, demo_store: Path) -> None:
    assert_one_line_error(cli("runs", "compare", "latest:score"), "at least two runs")
    assert_one_line_error(cli("runs", "compare", "latest:score", "NOPE"), "no run matches 'NOPE'")
    assert_one_line_error(
        cli("runs", "compare", "latest:score", "latest:score"), "the same run is given twice"
    )


def test_tags_and_notes_are_stored_shown_and_removed(cli, demo_store: Path) -> None:
    before = _snapshot(demo_store)
    ok = cli(
        "--json", "runs", "tag", "latest:perturb", "paper=fig3", "verdict=keep", "--note", "n1"
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["tags"] == {"note": "n1", "paper": "fig3", "verdict": "keep"}
    shown = json.loads(cli("--json", "runs", "show", "latest:perturb").stdout)
    assert shown["tags"] == {"note": "n1", "paper": "fig3", "verdict": "keep"}
    text = cli("runs", "show", "latest:perturb").stdout
    assert "verdict" in text and "keep" in text
    removed = cli("--json", "runs", "tag", "latest:perturb", "verdict=")
    assert json.loads(removed.stdout)["tags"] == {"note": "n1", "paper": "fig3"}
    perturb = shown["run"]["run_id"]
    stored = store_rows(
        demo_store, "SELECT key, value FROM run_tags WHERE run_id = ? ORDER BY key", [perturb]
    )
    assert stored == [("note", "n1"), ("paper", "fig3")]
    assert _snapshot(demo_store) == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (("latest:perturb", "novalue"), "must be KEY=VALUE"),
        (("latest:perturb", "mlflow.user=x"), "reserved prefix"),
        (("latest:perturb", "1bad=x"), "must start with a letter"),
        (("latest:perturb",), "nothing to tag"),
        (("NOPE", "a=b"), "no run matches 'NOPE'"),
    ],
)
def test_tag_bad_input(cli, demo_store: Path, args, needle) -> None:
    before = _snapshot(demo_store)
    assert_one_line_error(cli("runs", "tag", *args), needle)
    assert _snapshot(demo_store) == before
    assert store_rows(demo_store, "SELECT count(*) FROM run_tags")[0][0] == 0


def _example_answers(cli, store: Path) -> dict[str, list[dict]]:
    names = [
        q["name"]
        for q in json.loads(cli("--json", "sql", "--file", str(EXAMPLES), "--list").stdout)
    ]
    answers = {}
    for name in names:
        result = cli(
            "--store", str(store), "--json", "sql", "--file", str(EXAMPLES), "--name", name
        )
        assert result.exit_code == 0, f"{name}: {result.output}"
        answers[name] = json.loads(result.stdout)
    return answers


def test_export_import_round_trip_answers_the_example_queries_alike(
    cli, demo_store: Path, tmp_path: Path
) -> None:
    cli("runs", "tag", "latest:score", "paper=fig3")
    out = tmp_path / "export"
    exported = cli(
        "--json", "runs", "export", "latest:perturb", "--with-ancestors", "--to", str(out)
    )
    assert exported.exit_code == 0, exported.output
    all_runs = [r for r, _ in _snapshot(demo_store)]
    assert sorted(json.loads(exported.stdout)["runs"]) == sorted(all_runs)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source_store"] == str(demo_store.resolve())
    assert [m["name"] for m in provenance["schema"]][0] == "0001_runs.sql"
    target = tmp_path / "laptop_store"
    imported = cli("--store", str(target), "--json", "db", "import", str(out))
    assert imported.exit_code == 0, imported.output
    assert sorted(json.loads(imported.stdout)["imported"]) == sorted(all_runs)
    # Every example query gives the same rows on both stores.
    source_answers = _example_answers(cli, demo_store)
    target_answers = _example_answers(cli, target)
    assert source_answers.keys() == target_answers.keys()
    for name in source_answers:
        assert same_rows(source_answers[name], target_answers[name]), name
    assert any(source_answers[name] for name in source_answers)  # not all empty
    # Rows of every run table and artifacts are identical.
    for table in (
        "runs",
        "run_metrics",
        "tensor_stats",
        "ranked_weights",
        "evaluations",
        "run_tags",
    ):
        cols = "* EXCLUDE (mlflow_run_id)" if table == "runs" else "*"
        query = f"SELECT {cols} FROM {table} ORDER BY ALL"
        assert store_rows(demo_store, query) == store_rows(target, query), table
    for run_id, name in store_rows(demo_store, "SELECT run_id, name FROM run_artifacts"):
        a = (demo_store / "artifacts" / run_id / name).read_bytes()
        b = (target / "artifacts" / run_id / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    # A second import skips what is there, and says which.
    again = cli("--store", str(target), "db", "import", str(out))
    assert again.exit_code == 0
    assert f"skipped {len(all_runs)} run(s) already in this store" in again.stderr
    assert len(_snapshot(target)) == len(all_runs)


def test_export_of_one_run_reports_missing_parents_on_import(
    cli, demo_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "one"
    assert cli("runs", "export", "latest:rank", "--to", str(out)).exit_code == 0
    result = cli("--store", str(tmp_path / "t"), "--json", "db", "import", str(out))
    data = json.loads(result.stdout)
    score = store_rows(demo_store, "SELECT run_id FROM runs WHERE stage = 'score'")[0][0]
    assert data["missing_parents"] == [score] and len(data["imported"]) == 1


def test_export_bad_input_changes_nothing(cli, demo_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert_one_line_error(cli("runs", "export", "NOPE", "--to", str(out)), "no run matches 'NOPE'")
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert_one_line_error(cli("runs", "export", "latest", "--to", str(busy)), "not an empty folder")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def _export(cli, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    assert cli("runs", "export", "latest:rank", "--with-ancestors", "--to", str(out)).exit_code == 0
    return out


def test_import_into_a_store_with_a_newer_schema_is_refused(
    cli, demo_store: Path, tmp_path: Path
) -> None:
    out = _export(cli, tmp_path)
    target = tmp_path / "newer"
    Store.open(target)
    con = duckdb.connect(str(target / "cwa.duckdb"))
    con.execute("INSERT INTO cwa_migrations VALUES (99, '0099_future.sql', 'x', now())")
    con.close()
    assert_one_line_error(
        cli("--store", str(target), "db", "import", str(out)), "newer than this cwa"
    )
    assert store_rows(target, "SELECT count(*) FROM runs")[0][0] == 0
    assert list((target / "artifacts").iterdir()) == []


def test_import_of_an_older_export_or_damaged_artifacts_is_refused(
    cli, demo_store: Path, tmp_path: Path
) -> None:
    out = _export(cli, tmp_path)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    provenance = json.loads((old / "provenance.json").read_text())
    provenance["schema"] = provenance["schema"][:-1]
    (old / "provenance.json").write_text(json.dumps(provenance))
    target = tmp_path / "target"
    assert_one_line_error(
        cli("--store", str(target), "db", "import", str(old)), "newer schema than the export"
    )
    assert not target.exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (score_file,) = damaged.glob("artifacts/*/scores.safetensors")
    score_file.write_bytes(score_file.read_bytes()[:-1] + b"\x00")
    assert_one_line_error(
        cli("--store", str(target), "db", "import", str(damaged)), "does not match"
    )
    assert not target.exists()
    assert_one_line_error(
        cli("--store", str(target), "db", "import", str(tmp_path / "nope")), "not a folder"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        cli("--store", str(target), "db", "import", str(empty)), "not a cwa export"
    )
    assert not target.exists()


def test_gc_removes_only_folders_without_a_run(cli, demo_store: Path) -> None:
    root = demo_store / "artifacts"
    kept = sorted(p.name for p in root.iterdir())
    orphan = root / "01KILLEDRUNXXXXXXXXXXXXXXX"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "scores.safetensors").write_bytes(b"a" * 3000)
    (orphan / "sub" / "x.bin").write_bytes(b"b" * 1234)
    (root / "stray.tmp").write_bytes(b"c" * 10)
    dry = cli("--json", "db", "gc", "--dry-run")
    assert dry.exit_code == 0, dry.output
    data = json.loads(dry.stdout)
    assert data["bytes_reclaimable"] == 3000 + 1234 + 10 and data["bytes_freed"] == 0
    assert orphan.exists()
    done = json.loads(cli("--json", "db", "gc").stdout)
    assert done["bytes_freed"] == 4244
    assert sorted(e["name"] for e in done["removed"]) == [orphan.name, "stray.tmp"]
    assert sorted(p.name for p in root.iterdir()) == kept
    text = cli("db", "gc")
    assert text.exit_code == 0 and "Freed 0 B" in text.stderr


def test_shell_completion_is_available() -> None:
    import os
    import subprocess

    cwa = shutil.which("cwa")
    if cwa is None:
        pytest.skip("the cwa entry point is not installed (pip install -e .)")
    env = {
        **os.environ,
        "_CWA_COMPLETE": "complete_bash",
        "COMP_WORDS": "cwa runs c",
        "COMP_CWORD": "2",
    }
    done = subprocess.run([cwa], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "compare" in done.stdout.split()
    script = subprocess.run(
        [cwa, "--show-completion", "bash"], capture_output=True, text=True, timeout=60
    )
    assert "complete -o default -F _cwa_completion cwa" in script.stdout


def test_management_commands_stay_light(demo_store: Path) -> None:
    import subprocess
    import sys
    import textwrap

    heavy = ("torch", "transformers", "datasets", "mlflow", "sklearn", "matplotlib", "scipy")
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from cwa_cli.main import app
        runner = CliRunner()
        for args in (["sql", "--file", {str(EXAMPLES)!r}, "--list"],
                     ["sql", "--file", {str(EXAMPLES)!r}, "--name", "lineage"],
                     ["runs", "compare", "latest:evaluate", "latest:perturb"],
                     ["runs", "tag", "latest:score", "a=b"], ["db", "gc", "--dry-run"]):
            result = runner.invoke(app, ["--store", {str(demo_store)!r}, "--no-mlflow", *args])
            assert result.exit_code == 0, (args, result.output)
        print(",".join(sorted(m for m in {heavy!r} if m in sys.modules)))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy imports: {proc.stdout}"
