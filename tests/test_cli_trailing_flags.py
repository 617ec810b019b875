"""--json and --quiet are accepted after the subcommand as well as before it."""

from __future__ import annotations

import json


def test_json_after_the_subcommand_equals_json_before(cli, tiny_world) -> None:
    model = str(tiny_world["model"])
    before = cli("--json", "model", "inspect", model)
    after = cli("model", "inspect", model, "--json")
    assert before.exit_code == 0 and after.exit_code == 0, after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert json.loads(after.stdout)["n_layers"] == 2


def test_trailing_flags_on_runs_and_sql(cli, tiny_world, store_path) -> None:
    out = cli("--json", "score", "--model", str(tiny_world["model"]), "--metric", "magnitude")
    assert out.exit_code == 0, out.stderr
    run_id = json.loads(out.stdout)["runs"][0]["run_id"]
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [run_id]
    quiet = cli("rank", run_id, "-k", "5", "-q")
    assert quiet.exit_code == 0 and quiet.stdout.strip().startswith("0")  # only the run id
    assert "top rows" not in quiet.stderr
    sql = cli("sql", "SELECT count(*) AS n FROM runs", "--json")
    assert sql.exit_code == 0, sql.stderr
    assert json.loads(sql.stdout) == [{"n": 2}]
