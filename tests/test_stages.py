"""The stages end to end on a tiny local model: score -> rank -> evaluate -> perturb, through the
CLI, checked against independent computations from the stored artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from _cli_checks import assert_error_is_last_line
from _store_access import store_rows
from safetensors import safe_open


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _tiny_model_and_data(world) -> tuple[str, ...]:
    """The tiny world's model and a small calibration sample of its text."""
    return ("--model", str(world["model"]), "--data", str(world["text"]),
            "--n-samples", "8", "--seq-len", "16")  # fmt: skip


def _score(cli, world, *extra: str) -> list[str]:
    out = _ok(cli("--json", "score", *_tiny_model_and_data(world), "--batch-size", "4", *extra))
    return [r["run_id"] for r in out["runs"]]


def test_score_seeds_are_separate_runs_and_deterministic(cli, tiny_world, store_path) -> None:
    a, b = _score(cli, tiny_world, "--seeds", "0,1")
    (c,) = _score(cli, tiny_world, "--seed", "0")
    files = {r: store_path / "artifacts" / r / "scores.safetensors" for r in (a, b, c)}
    assert files[a].read_bytes() == files[c].read_bytes()  # same seed: byte-identical
    assert files[a].read_bytes() != files[b].read_bytes()  # other seed: other calibration sample
    model = torch.nn.Module()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"])
    names = [n for n, _ in model.named_parameters()]
    stats = store_rows(
        store_path,
        "SELECT parameter, numel, max, sum FROM tensor_stats WHERE run_id = ? ORDER BY parameter",
        [a],
    )
    assert sorted(n for n, *_ in stats) == sorted(names)
    with safe_open(str(files[a]), "pt") as f:
        for name, numel, vmax, vsum in stats:
            t = f.get_tensor(name).double()
            assert t.numel() == numel
            assert vmax == pytest.approx(float(t.max()), rel=1e-6)
            assert vsum == pytest.approx(float(t.sum()), rel=1e-5)
    ((loss, tokens),) = store_rows(
        store_path,
        "SELECT max(value) FILTER (name = 'calibration_loss'), "
        "max(value) FILTER (name = 'calibration_tokens') FROM run_metrics "
        "WHERE run_id = ?",
        [a],
    )
    assert 0 < loss < 10 and tokens == 8 * 15
    ((config,),) = store_rows(store_path, "SELECT config FROM runs WHERE run_id = ?", [a])
    assert json.loads(config)["metric_config"]["metric"] == "grad_x_weight"


def test_rank_matches_brute_force_sort_of_the_score_file(cli, tiny_world, store_path) -> None:
    (score_id,) = _score(cli, tiny_world)
    out = _ok(cli("--json", "rank", score_id, "--topk", "25"))
    rank_id = out["runs"][0]["run_id"]
    rows = store_rows(
        store_path,
        "SELECT rank, parameter, flat_index, score FROM ranked_weights "
        "WHERE run_id = ? ORDER BY rank",
        [rank_id],
    )
    order = []
    with safe_open(str(store_path / "artifacts" / score_id / "scores.safetensors"), "pt") as f:
        from transformers import AutoModelForCausalLM

        names = [
            n
            for n, _ in AutoModelForCausalLM.from_pretrained(tiny_world["model"]).named_parameters()
        ]
        for p_order, name in enumerate(names):
            flat = f.get_tensor(name).reshape(-1).tolist()
            order += [(-s, p_order, i, name) for i, s in enumerate(flat)]
    order.sort()
    expected = [(r + 1, name, i) for r, (_, _, i, name) in enumerate(order[:25])]
    assert [(r, p, i) for r, p, i, _ in rows] == expected
    ((parent,),) = store_rows(
        store_path, "SELECT parent_run_id FROM run_parents WHERE run_id = ?", [rank_id]
    )
    assert parent == score_id


def test_rank_export_and_wrong_stage(cli, tiny_world, store_path, tmp_path) -> None:
    (score_id,) = _score(cli, tiny_world)
    csv = tmp_path / "top_weights.csv"
    _ok(cli("--json", "rank", score_id, "-k", "5", "--mode", "layer", "--export", str(csv)))
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("rank,parameter,flat_index") and len(lines) == 1 + 5 * 3
    result = cli("rank", "latest:rank")
    assert result.exit_code == 1 and "a score run is needed" in result.stderr


def test_evaluate_reuses_stored_results_unless_forced(cli, tiny_world, store_path) -> None:
    tasks = (
        f"perplexity:{tiny_world['text']},hellaswag:{tiny_world['hellaswag']},"
        f"lambada:{tiny_world['lambada']}"
    )
    first = _ok(cli("--json", "evaluate", "--model", str(tiny_world["model"]), "--tasks", tasks))
    assert {(r["task"], r["metric"]) for r in first["results"]} >= {
        ("perplexity", "perplexity"),
        ("hellaswag", "acc"),
        ("hellaswag", "acc_norm"),
        ("lambada", "acc"),
        ("lambada", "perplexity"),
    }
    assert all(r["reused_from"] is None for r in first["results"])
    second = _ok(cli("--json", "evaluate", "--model", str(tiny_world["model"]), "--tasks", tasks))
    assert {r["reused_from"] for r in second["results"]} == {first["run_id"]}
    assert [r["value"] for r in second["results"]] == [r["value"] for r in first["results"]]
    forced = _ok(
        cli("--json", "evaluate", "--model", str(tiny_world["model"]), "--tasks", tasks, "--force")
    )
    assert all(r["reused_from"] is None for r in forced["results"])
    assert [r["value"] for r in forced["results"]] == pytest.approx(
        [r["value"] for r in first["results"]], abs=1e-9
    )


def test_perturb_conditions_controls_and_effects_view(cli, tiny_world, store_path) -> None:
    from transformers import AutoModelForCausalLM

    from cwa.models.loading import model_fingerprint

    (score_id,) = _score(cli, tiny_world)
    rank_id = _ok(cli("--json", "rank", score_id, "-k", "30"))["runs"][0]["run_id"]
    tasks = f"perplexity:{tiny_world['text']}"
    out = _ok(
        cli(
            "--json",
            "perturb",
            rank_id,
            "--method",
            "sign_flip",
            "--controls",
            "random_k,bottom_k,all_k",
            "--seeds",
            "0,1",
            "--k-values",
            "10,30",
            "--eval",
            tasks,
        )
    )
    run_id = out["runs"][0]["run_id"]
    conds = store_rows(
        store_path,
        "SELECT selection, k, seed, n_changed, restored FROM "
        "perturbation_conditions WHERE run_id = ? ORDER BY condition_id",
        [run_id],
    )
    n_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_world["model"]).parameters()
    )
    by_sel = {}
    for sel, k, seed, n_changed, restored in conds:
        assert restored
        by_sel.setdefault(sel, []).append((k, seed, n_changed))
    assert sorted(by_sel["top_k"]) == [(10, None, 10), (30, None, 30)]
    assert sorted(by_sel["random_k"]) == [(10, 0, 10), (10, 1, 10), (30, 0, 30), (30, 1, 30)]
    assert sorted(k for k, _, _ in by_sel["bottom_k"]) == [10, 30]
    assert by_sel["all_k"][0][0] == n_params  # whole model in scope (tied lm_head once)
    effects = store_rows(
        store_path,
        "SELECT selection, k, metric, value, baseline, delta FROM "
        "perturbation_effects WHERE run_id = ? AND metric = 'perplexity'",
        [run_id],
    )
    assert len(effects) == len(conds)
    for _sel, _k, _m, value, baseline, delta in effects:
        assert delta == pytest.approx(value - baseline)
    # the model on disk is untouched and the run recorded the same fingerprint
    ((fp,),) = store_rows(
        store_path, "SELECT model_fingerprint FROM runs WHERE run_id = ?", [run_id]
    )
    assert fp == model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_world["model"]))


def test_failed_evaluation_mid_sweep_marks_run_failed(
    cli, tiny_world, store_path, monkeypatch
) -> None:
    import cwa.evaluation.runner as runner

    (score_id,) = _score(cli, tiny_world)
    rank_id = _ok(cli("--json", "rank", score_id, "-k", "10"))["runs"][0]["run_id"]
    real = runner.evaluate_model
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("evaluation exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_model", flaky)
    result = cli(
        "perturb", rank_id, "--eval", f"perplexity:{tiny_world['text']}", "--controls", "random_k"
    )
    assert result.exit_code == 1 and "evaluation exploded" in result.stderr
    ((status, error),) = store_rows(
        store_path, "SELECT status, error FROM runs WHERE stage = 'perturb'"
    )
    assert status == "failed" and "evaluation exploded" in error
    assert store_rows(store_path, "SELECT count(*) FROM perturbation_conditions") == [(0,)]


@pytest.mark.parametrize(
    "args, message",
    [
        (("score", "--metric", "grad_x_wieght"), "did you mean 'grad_x_weight'"),
        (("score", "--data", "/nonexistent/file.txt"), "file.txt"),
        (("perturb", "latest", "--method", "scale"), "needs --scale"),
        (("perturb", "latest", "--method", "sign_flip", "--bit", "3"), "--bit applies only"),
        (("evaluate", "--model", "toy", "--limit", "0"), "--limit"),
        (("evaluate", "--model", "toy", "--tasks", "nope"), "unknown task"),
    ],
)
def test_stage_bad_input(cli, tiny_world, store_path, args, message) -> None:
    args = tuple(str(tiny_world["model"]) if a == "MODEL" else a for a in args)
    if args[0] == "score":
        args = (*args, "--model", str(tiny_world["model"]))
    result = cli(*args)
    assert_error_is_last_line(result, message)
    if store_path.exists():  # nothing registered: no run, failed or otherwise
        assert store_rows(store_path, "SELECT count(*) FROM runs") == [(0,)]


def test_user_metric_plugin_by_module_function(
    cli, tiny_world, store_path, tmp_path, monkeypatch
) -> None:
    plugin = tmp_path / "my_metrics.py"
    plugin.write_text(
        "version = '7'\n"
        "def squared_weight(ctx):\n"
        "    for name in ctx.selected:\n"
        "        yield name, ctx.parameters[name].detach().float() ** 2\n"
        "squared_weight.version = '7'\n"
        "squared_weight.needs_data = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (run_id,) = _score(cli, tiny_world, "--metric", "my_metrics:squared_weight")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"])
    with safe_open(str(store_path / "artifacts" / run_id / "scores.safetensors"), "pt") as f:
        for name, param in model.named_parameters():
            assert torch.equal(f.get_tensor(name), param.detach() ** 2)


def test_model_inspect_cli(cli, tiny_world) -> None:
    out = _ok(cli("--json", "model", "inspect", str(tiny_world["model"])))
    assert out["family"] == "gpt2" and out["n_layers"] == 2 and out["n_heads"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"])
    assert out["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(r["n_params"] for r in out["rows"]) == out["total_params"]
    human = cli("model", "inspect", str(tiny_world["model"]))
    assert human.exit_code == 0 and "attn_q" in human.stdout
    missing = cli("model", "inspect", "/nonexistent/model")
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: ")


def test_cwa_run_chains_stages_with_lineage_and_exports(
    cli, tiny_world, store_path, tmp_path
) -> None:
    out_dir = tmp_path / "results"
    out = _ok(
        cli(
            "--json",
            "run",
            *_tiny_model_and_data(tiny_world),
            "--topk",
            "20",
            "--perturb",
            "zero",
            "--controls",
            "random_k",
            "--seeds",
            "0,1",
            "--tasks",
            f"perplexity:{tiny_world['text']}",
            "--out-dir",
            str(out_dir),
        )
    )
    runs = out["runs"]
    parents = store_rows(store_path, "SELECT run_id, parent_run_id, role FROM run_parents")
    assert (runs["rank"], runs["score"], "scores") in parents
    assert (runs["perturb"], runs["rank"], "ranking") in parents
    assert (runs["perturb"], runs["evaluate"], "baseline") in parents
    assert {s["selection"] for s in out["summary"]} == {"top_k", "random_k"}
    for name in (
        "top_weights.csv",
        "perturbation_results.csv",
        "sensitivity_stats.csv",
        "config.json",
        "manifest.json",
    ):
        assert (out_dir / name).is_file(), name
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["runs"] == runs
    assert len((out_dir / "top_weights.csv").read_text().splitlines()) == 21
    # the baseline was evaluated once, by the evaluate run, and reused by perturb
    reused = store_rows(
        store_path,
        "SELECT DISTINCT reused_from FROM evaluations WHERE run_id = ? AND condition_id IS NULL",
        [runs["perturb"]],
    )
    assert reused == [(runs["evaluate"],)]


def test_head_ranking_controls_stay_inside_attention_heads(cli, tiny_world, store_path) -> None:
    (score_id,) = _score(cli, tiny_world)
    rank_id = _ok(cli("--json", "rank", score_id, "-k", "2", "--mode", "head"))["runs"][0]["run_id"]
    ((n_ranked,),) = store_rows(
        store_path, "SELECT count(*) FROM ranked_weights WHERE run_id = ?", [rank_id]
    )
    assert n_ranked == 2 * 2 * 4  # 2 per head, 2 layers x 4 heads
    assert "Progressive" in cli("perturb", rank_id, "--k-values", "3").stderr
    out = _ok(
        cli(
            "--json",
            "perturb",
            rank_id,
            "--controls",
            "random_k",
            "--eval",
            f"perplexity:{tiny_world['text']}",
        )
    )
    conds = store_rows(
        store_path,
        "SELECT selection, k, n_changed, scope FROM perturbation_conditions WHERE run_id = ?",
        [out["runs"][0]["run_id"]],
    )
    assert {(sel, k) for sel, k, _, _ in conds} == {("top_k", n_ranked), ("random_k", n_ranked)}
    scope = json.loads(conds[0][3])
    assert scope["components"] == ["attn_q", "attn_k", "attn_v", "attn_o"]
    assert len(scope["heads"]) == 8
    # the scope is exactly the attention-head elements: q,k,v weights+biases and o columns
    assert scope["n_weights"] == 2 * (32 * 96 + 96 + 32 * 32)


def test_progressive_sweep_mirrors_to_mlflow(cli, tiny_world, store_path, monkeypatch) -> None:
    import mlflow

    (score_id,) = _score(cli, tiny_world)
    rank_id = _ok(cli("--json", "rank", score_id, "-k", "20"))["runs"][0]["run_id"]
    monkeypatch.setenv("CWA_MLFLOW", "1")
    result = cli(
        "--json",
        "perturb",
        rank_id,
        "--k-values",
        "5,20",
        "--controls",
        "random_k",
        "--eval",
        f"perplexity:{tiny_world['text']}",
    )
    out = _ok(result)
    assert "MLflow mirror failed" not in result.stderr
    mlflow_id = out["runs"][0]["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store_path / 'mlflow.db'}")
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED"
    assert "random_k.k5.perplexity.perplexity.mean" in run.data.metrics
