"""The analyze stage's framework: registry, input resolution, validation, writing, CLI."""

from __future__ import annotations

import json

import pytest
from _analysis_world import (
    add_score_run,
    gpt2_config,
    param_shapes,
    random_scores,
    run_count,
    save_config_model,
)

from cwa.analysis import ANALYZERS, get_analyzer, list_analyzers
from cwa.analysis.base import (
    AnalysisResult,
    AnalyzerOption,
    AnalyzerSpec,
    DisplayTable,
    KValue,
    parse_k_values,
    parse_option_pairs,
)
from cwa.errors import InvalidInput, RunNotFound, UnknownName
from cwa.stages.analyze import AnalyzeConfig, run_analyze


def _tensor_sums(inputs, options, reporter):
    """Per run and tensor: sum of scores times a factor (an honest, checkable plugin)."""
    rows = []
    for run in inputs.runs:
        with inputs.open_scores(run) as reader:
            for name in reader.names():
                total = float(reader.get(name).double().sum()) * options["factor"]
                rows.append({"score_run_id": run.run_id, "parameter": name, "total": total})
    return AnalysisResult(
        tables={"plugin_tensor_sums": rows},
        metrics={"n_rows": float(len(rows))},
        display=[
            DisplayTable(
                "sums", ("parameter", "total"), [(r["parameter"], r["total"]) for r in rows]
            )
        ],
    )


TENSOR_SUMS = AnalyzerSpec(
    name="tensor_sums",
    version="1",
    description="sum of scores per tensor (test plugin)",
    input_stages=("score",),
    run=_tensor_sums,
    min_runs=1,
    max_runs=3,
    same_model=True,
    options=(AnalyzerOption("factor", "float", 1.0, "multiply sums", minimum=0.0),),
    tables=("plugin_tensor_sums",),
)


@pytest.fixture
def world(tmp_path, store):
    model_dir = save_config_model(gpt2_config(), tmp_path / "gpt2cfg")
    shapes = param_shapes(gpt2_config())
    scores = [random_scores(shapes, seed) for seed in range(3)]
    ids = [
        add_score_run(store, model_dir, s, seed=i, experiment="seeds") for i, s in enumerate(scores)
    ]
    return {"model_dir": model_dir, "shapes": shapes, "scores": scores, "ids": ids}


@pytest.fixture
def plugin():
    with ANALYZERS.isolated():
        ANALYZERS.add("tensor_sums", TENSOR_SUMS)
        yield


def test_k_values_and_option_pairs():
    assert parse_k_values("100, 1000,0.1%") == [KValue(100), KValue(1000), KValue(fraction=0.001)]
    assert KValue(fraction=0.001).resolve(124_000) == 124
    assert KValue(fraction=0.001).label == "0.1%"
    for bad in ("0", "abc", "150%", ""):
        with pytest.raises(InvalidInput):
            parse_k_values(bad)
    assert parse_option_pairs(["a=1", "rank-run=X"]) == {"a": "1", "rank_run": "X"}
    with pytest.raises(InvalidInput, match="key=value"):
        parse_option_pairs(["nope"])


def test_plugin_results_stored_and_checked(store, world, plugin):
    outcome = run_analyze(
        store,
        AnalyzeConfig("tensor_sums", runs=world["ids"][:2], options={"factor": "2"}),
        mlflow=False,
    )
    with store.read() as con:
        rows = con.execute(
            "SELECT data FROM analysis_rows WHERE run_id = ? ORDER BY row_index", [outcome.run_id]
        ).fetchall()
        parents = con.execute(
            "SELECT parent_run_id, role FROM run_parents WHERE run_id = ? ORDER BY 1",
            [outcome.run_id],
        ).fetchall()
        config = json.loads(
            con.execute("SELECT config FROM runs WHERE run_id = ?", [outcome.run_id]).fetchone()[0]
        )
    data = [json.loads(r[0]) for r in rows]
    assert len(data) == 2 * len(world["shapes"])
    first = world["scores"][0]
    for row in data[: len(world["shapes"])]:
        expected = 2.0 * float(first[row["parameter"]].double().sum())
        assert row["total"] == pytest.approx(expected, rel=1e-12)
    assert parents == sorted((i, "input") for i in world["ids"][:2])
    assert config["options"] == {"factor": 2.0}
    assert config["analyzer"] == "tensor_sums" and config["inputs"] == world["ids"][:2]
    assert outcome.metrics == {"n_rows": float(len(data))}


def test_inputs_from_experiment_and_latest(store, world, plugin):
    outcome = run_analyze(
        store, AnalyzeConfig("tensor_sums", input_experiment="seeds"), mlflow=False
    )
    with store.read() as con:
        config = json.loads(
            con.execute("SELECT config FROM runs WHERE run_id = ?", [outcome.run_id]).fetchone()[0]
        )
    assert config["inputs"] == world["ids"]
    outcome = run_analyze(store, AnalyzeConfig("tensor_sums"), mlflow=False)  # latest:score
    with store.read() as con:
        parents = con.execute(
            "SELECT parent_run_id FROM run_parents WHERE run_id = ?", [outcome.run_id]
        ).fetchall()
    assert parents == [(world["ids"][-1],)]
    prefix = world["ids"][0][:20]
    run_analyze(store, AnalyzeConfig("tensor_sums", runs=[prefix]), mlflow=False)


def test_bad_inputs_register_nothing(store, world, plugin, tmp_path):
    other_dir = save_config_model(gpt2_config(n_embd=8), tmp_path / "other")
    other = add_score_run(store, other_dir, random_scores(param_shapes(gpt2_config(n_embd=8)), 0))
    before = run_count(store)
    cases = [
        (AnalyzeConfig("tensor_sumz"), UnknownName, "did you mean 'tensor_sums'"),
        (
            AnalyzeConfig("tensor_sums", runs=[world["ids"][0], other]),
            InvalidInput,
            "different models",
        ),
        (AnalyzeConfig("tensor_sums", runs=world["ids"] + [other]), InvalidInput, "at most 3"),
        (AnalyzeConfig("tensor_sums", options={"factr": "1"}), InvalidInput, "did you mean factor"),
        (AnalyzeConfig("tensor_sums", options={"factor": "-1"}), InvalidInput, "at least 0"),
        (AnalyzeConfig("tensor_sums", options={"factor": "x"}), InvalidInput, "expected a float"),
        (AnalyzeConfig("tensor_sums", runs=["ZZZZ"]), RunNotFound, "no run matches"),
        (AnalyzeConfig("tensor_sums", runs=[world["ids"][0]] * 2), InvalidInput, "twice"),
        (AnalyzeConfig("tensor_sums", input_experiment="nope"), InvalidInput, "no succeeded score"),
    ]
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            run_analyze(store, config, mlflow=False)
    assert run_count(store) == before


def test_wrong_stage_registers_nothing(store, world, plugin):
    from cwa.lifecycle import StageOutput, StageRequest, execute_stage

    rank_id = execute_stage(
        store,
        StageRequest(stage="rank", config={}, parents=[(world["ids"][0], "scores")]),
        lambda ctx: StageOutput(),
        mlflow=False,
    ).run_id
    before = run_count(store)
    with pytest.raises(InvalidInput, match=f"{rank_id} is a rank run, but analyzer tensor_sums"):
        run_analyze(store, AnalyzeConfig("tensor_sums", runs=[rank_id]), mlflow=False)
    assert run_count(store) == before


def test_architecture_from_config_only(store, world):
    from cwa.analysis.base import AnalysisInputs
    from cwa.store.runs import fetch_run

    with store.read() as con:
        record = fetch_run(con, world["ids"][0])
    arch = AnalysisInputs(store, [record]).architecture(record)
    assert list(arch.params) == list(world["shapes"])
    assert arch.params["transformer.h.1.attn.c_attn.weight"].components == (
        "attn_q",
        "attn_k",
        "attn_v",
    )
    assert arch.n_heads == 4 and arch.n_layers == 2


def test_undeclared_table_fails_the_run(store, world):
    def bad(inputs, options, reporter):
        return AnalysisResult(tables={"elsewhere": [{"a": 1}]})

    spec = AnalyzerSpec("bad", "1", "returns an undeclared table", ("score",), bad)
    with ANALYZERS.isolated():
        ANALYZERS.add("bad", spec)
        with pytest.raises(InvalidInput, match="does not declare"):
            run_analyze(store, AnalyzeConfig("bad"), mlflow=False)
    with store.read() as con:
        status = con.execute("SELECT status FROM runs WHERE stage = 'analyze'").fetchone()[0]
    assert status == "failed"


def test_every_registered_analyzer_follows_the_contract():
    names = [n for n, _ in list_analyzers()]
    for name, description in list_analyzers():
        spec = get_analyzer(name)
        assert spec.name == name and spec.description == description
        assert spec.input_stages and spec.version and spec.min_runs >= 1
        assert spec.max_runs is None or spec.max_runs >= spec.min_runs
        for opt in spec.options:
            opt.default_value()  # every default parses
        assert callable(spec.run)
    assert names == sorted(names)


def test_declared_tables_exist(store):
    from cwa.store.runs import result_tables

    with store.read() as con:
        tables = set(result_tables(con))
    for name, _ in list_analyzers():
        missing = [t for t in get_analyzer(name).tables if t not in tables]
        assert not missing, f"{name} declares tables missing from the schema: {missing}"


def test_cli_list_plugin_json_and_errors(cli, store, world):
    result = cli("analyze", "--list", "--plugin", "test_analysis_framework:TENSOR_SUMS")
    assert result.exit_code == 0, result.output
    assert "tensor_sums" in result.stdout
    before = run_count(store)
    result = cli("--json", "analyze", "test_analysis_framework:TENSOR_SUMS", world["ids"][0])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["runs"][0]["stage"] == "analyze"
    totals = {r["parameter"]: r["total"] for r in doc["tables"][0]["rows"]}
    for name, tensor in world["scores"][0].items():
        assert totals[name] == pytest.approx(float(tensor.double().sum()), rel=1e-12)
    assert run_count(store) == before + 1
    result = cli("analyze")
    assert result.exit_code == 2 and result.stderr.startswith("Error: give an analyzer name")
    result = cli("analyze", "nosuchanalyzer", world["ids"][0])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: unknown analyzer 'nosuchanalyzer'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_count(store) == before + 1
