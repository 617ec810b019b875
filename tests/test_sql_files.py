"""cwa sql: files, stdin, named queries, parameters, and every query of examples/queries.sql."""
# ruff: noqa: F811  (pytest fixtures imported from _demo_store are used as arguments)

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from _cli_checks import assert_one_line_error
from _demo_store import demo_store, demo_template  # noqa: F401

from cwa.errors import InvalidInput
from cwa.store.sqlfile import (
    bind_parameters,
    parse_named_queries,
    select_query,
    used_parameters,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "queries.sql"


def _runs_snapshot(store: Path) -> list[tuple]:
    con = duckdb.connect(str(store / "cwa.duckdb"), read_only=True)
    try:
        return con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall()
    finally:
        con.close()


def _raw(store: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(store / "cwa.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, floats up to summation order (DuckDB aggregates in parallel)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return False
        for key in x:
            u, v = x[key], y[key]
            if isinstance(u, float) and isinstance(v, float):
                if u != pytest.approx(v, rel=1e-9, abs=1e-12):
                    return False
            elif u != v:
                return False
    return True


def test_parse_named_queries_descriptions_and_defaults() -> None:
    text = (
        "-- a file comment\n\n"
        "-- name: first\n-- The first query.\n-- It has two lines.\nSELECT 1;\n\n"
        "-- name: second\n-- params: run=latest:perturb, k=5\n-- Second.\n"
        "SELECT $k AS k -- trailing\n;\n"
    )
    queries = parse_named_queries(text, "t.sql")
    assert [q.name for q in queries] == ["first", "second"]
    assert queries[0].description == "The first query. It has two lines."
    assert queries[0].sql == "SELECT 1;"
    assert queries[1].defaults == {"run": "latest:perturb", "k": "5"}
    assert queries[1].description == "Second."
    assert select_query(text, "second", "t.sql").line == 8
    assert select_query("SELECT 2", None).sql == "SELECT 2"
    with pytest.raises(InvalidInput, match="holds 2 named queries"):
        select_query(text, None, "t.sql")
    with pytest.raises(InvalidInput, match="used twice"):
        parse_named_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


def test_used_parameters_ignore_strings_and_comments() -> None:
    sql = "SELECT '$no', \"$nope\" FROM t -- $not\n/* $none */ WHERE a = $yes AND b = $yes2"
    assert used_parameters(sql) == ["yes", "yes2"]


def test_bind_parameters_resolves_run_references_only() -> None:
    seen = []

    def resolve(ref: str) -> str:
        seen.append(ref)
        return "RESOLVED"

    sql = "SELECT * FROM t WHERE run_id = $run AND x = $base_run AND r <= $k AND s = $label"
    values = bind_parameters(
        sql,
        {"k": "100", "label": "latest-ish"},
        {"run": "latest:rank", "base_run": "01AB"},
        resolve,
    )
    assert values == {"run": "RESOLVED", "base_run": "RESOLVED", "k": 100, "label": "latest-ish"}
    assert seen == ["latest:rank", "01AB"]
    with pytest.raises(InvalidInput, match=r"pass --param label=VALUE"):
        bind_parameters(sql, {}, {"run": "x", "base_run": "y", "k": "1"}, resolve)


def test_every_example_query_runs_on_a_demo_store(cli, demo_store: Path) -> None:
    listed = cli("--json", "sql", "--file", str(EXAMPLES), "--list")
    assert listed.exit_code == 0, listed.output
    names = [q["name"] for q in json.loads(listed.stdout)]
    assert len(names) >= 6 and len(names) == len(set(names))
    assert all(q["description"] for q in json.loads(listed.stdout))
    for name in names:
        result = cli("--json", "sql", "--file", str(EXAMPLES), "--name", name)
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert isinstance(json.loads(result.stdout), list)


def test_damage_query_matches_an_independent_computation(cli, demo_store: Path) -> None:
    out = cli("--json", "sql", "--file", str(EXAMPLES), "--name", "damage_per_selection")
    rows = {(r["selection"], r["task"], r["metric"]): r for r in json.loads(out.stdout)}
    # Recompute from the base tables with plain Python: mean over seeds of each condition.
    perturb = _raw(
        demo_store,
        "SELECT run_id FROM runs WHERE stage = 'perturb' AND status = 'succeeded' "
        "ORDER BY run_id DESC LIMIT 1",
    )[0][0]
    raw = _raw(
        demo_store,
        "SELECT c.selection, e.task, e.metric, e.value FROM evaluations e JOIN "
        "perturbation_conditions c USING (run_id, condition_id) WHERE e.run_id = ?",
        [perturb],
    )
    groups: dict[tuple, list[float]] = {}
    for selection, task, metric, value in raw:
        if metric != "tokens":
            groups.setdefault((selection, task, metric), []).append(value)
    assert set(groups) == set(rows)
    for key, values in groups.items():
        assert rows[key]["n"] == len(values)
        assert rows[key]["mean"] == pytest.approx(sum(values) / len(values))
    # The parameterised variant resolves latest:perturb and a unique prefix to the same run.
    for ref in ("latest:perturb", perturb[:12].lower()):
        again = cli(
            "--json", "sql", "--file", str(EXAMPLES), "--name", "damage_for_run", "-p", f"run={ref}"
        )
        assert again.exit_code == 0, again.output
        assert same_rows(json.loads(again.stdout), json.loads(out.stdout))


def test_stdin_and_comment_first_queries(cli, demo_store: Path) -> None:
    n_runs = len(_runs_snapshot(demo_store))
    piped = cli("--json", "sql", "-", input="-- how many runs?\nSELECT count(*) AS n FROM runs\n")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout) == [{"n": n_runs}]
    inline = cli("--json", "sql", "-- how many?\nSELECT count(*) AS n FROM runs")
    assert inline.exit_code == 0, inline.output
    assert json.loads(inline.stdout) == [{"n": n_runs}]


def test_parameters_are_bound_not_interpolated(cli, demo_store: Path, tmp_path: Path) -> None:
    before = _runs_snapshot(demo_store)
    sql_file = tmp_path / "q.sql"
    sql_file.write_text("SELECT count(*) AS n FROM runs WHERE stage = $stage\n")
    hostile = "score' OR '1'='1"
    out = cli("--json", "sql", "--file", str(sql_file), "--param", f"stage={hostile}")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == [{"n": 0}]
    scores = cli("--json", "sql", "--file", str(sql_file), "--param", "stage=score")
    n_score = sum(
        1
        for run_id, _ in before
        if _raw(demo_store, "SELECT stage FROM runs WHERE run_id = ?", [run_id])[0][0] == "score"
    )
    assert json.loads(scores.stdout) == [{"n": n_score}]
    assert _runs_snapshot(demo_store) == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--name", "no_such_query"), "no query named 'no_such_query'"),
        (("--name", "damage_per_selectio"), "did you mean 'damage_per_selection'"),
        ((), "holds"),
        (("--name", "lineage", "--param", "x=1"), "--param x is not used"),
        (("--name", "damage_for_run", "--param", "run"), "must be KEY=VALUE"),
        (("--name", "damage_for_run", "--param", "run=ZZZZZZ"), "no run matches 'ZZZZZZ'"),
    ],
)
def test_bad_named_query_input_is_one_line(cli, demo_store: Path, args, needle) -> None:
    before = _runs_snapshot(demo_store)
    result = cli("sql", "--file", str(EXAMPLES), *args)
    assert_one_line_error(result, needle)
    assert _runs_snapshot(demo_store) == before


@pytest.mark.parametrize(
    "content, args, needle",
    [
        ("-- name: wipe\n-- Looks harmless.\nDELETE FROM runs;\n", ("--name", "wipe"), "DELETE"),
        ("UPDATE runs SET status = 'failed';\n", (), "UPDATE"),
        ("SELECT 1; DROP TABLE runs;\n", (), "DROP"),
        ("SELECT 1; SELECT 2;\n", (), "2 statements"),
        ("-- name: p\nSELECT $missing;\n", ("--name", "p"), "pass --param missing=VALUE"),
        (None, (), "does not exist"),
    ],
)
def test_bad_sql_files_are_refused_and_change_nothing(
    cli, demo_store: Path, tmp_path: Path, content, args, needle
) -> None:
    before = _runs_snapshot(demo_store)
    path = tmp_path / "input.sql"
    if content is not None:
        path.write_text(content)
    result = cli("sql", "--file", str(path), *args)
    assert_one_line_error(result, needle)
    assert _runs_snapshot(demo_store) == before


def test_list_needs_no_store_and_file_and_query_conflict(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CWA_STORE", str(tmp_path / "nowhere"))
    listed = cli("sql", "--file", str(EXAMPLES), "--list")
    assert listed.exit_code == 0 and "damage_per_selection" in listed.stdout
    assert not (tmp_path / "nowhere").exists()
    both = cli("sql", "SELECT 1", "--file", str(EXAMPLES))
    assert both.exit_code == 1 and "not both" in both.stderr
    plain = tmp_path / "one.sql"
    plain.write_text("SELECT 1")
    no_names = cli("sql", "--file", str(plain), "--list")
    assert no_names.exit_code == 1 and "no '-- name: ...' headers" in no_names.stderr


def test_readme_sql_commands_work(cli, demo_store: Path, tmp_path: Path, monkeypatch) -> None:
    import shlex

    readme = (REPO / "README.md").read_text()
    commands = [
        line.split("#")[0].strip()
        for line in readme.splitlines()
        if line.startswith("cwa sql --file examples/queries.sql")
    ]
    assert len(commands) >= 4
    monkeypatch.chdir(tmp_path)  # -o writes here
    for command in commands:
        args = shlex.split(command.replace("examples/queries.sql", str(EXAMPLES)))[1:]
        result = cli(*args)
        assert result.exit_code == 0, f"{command}: {result.output}"
