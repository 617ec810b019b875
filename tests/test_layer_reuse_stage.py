"""``cwa perturb`` with layer reuse: the run records what it reused, and its evaluation rows and
per-item records equal those of the same sweep with ``--no-layer-reuse``."""

from __future__ import annotations

import json

from _store_access import store_rows


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _perturb(cli, rank_id: str, tasks: str, *extra: str) -> str:
    out = _ok(cli("--json", "perturb", rank_id, "--method", "scale", "--scale", "-3",
                  "--controls", "random_k", "--seeds", "0,1,2", "--layers", "1",
                  "--eval", tasks, *extra))  # fmt: skip
    return out["runs"][0]["run_id"]


def test_perturb_reuses_layers_with_the_numbers_of_full_evaluations(
    cli, tiny_world, store_path
) -> None:
    score_id = _ok(cli("--json", "score", "--model", str(tiny_world["model"]), "--data",
                       str(tiny_world["text"]), "--n-samples", "4", "--seq-len", "16"))  # fmt: skip
    score_id = score_id["runs"][0]["run_id"]
    rank_id = _ok(cli("--json", "rank", score_id, "-k", "2000"))["runs"][0]["run_id"]
    tasks = (
        f"perplexity:{tiny_world['text']},hellaswag:{tiny_world['hellaswag']},"
        f"lambada:{tiny_world['lambada']}"
    )
    reused = _perturb(cli, rank_id, tasks)
    full = _perturb(cli, rank_id, tasks, "--no-layer-reuse")

    def config(run_id: str) -> dict:
        ((text,),) = store_rows(store_path, "SELECT config FROM runs WHERE run_id = ?", [run_id])
        return json.loads(text)["layer_reuse"]

    on, off = config(reused), config(full)
    # 4 conditions (top_k, random_k x 3 seeds), all within layer 1 of the 2-layer model.
    assert on["from_layer"] == 1
    assert (on["conditions_captured"], on["conditions_replayed"], on["conditions_full"]) == (
        1,
        3,
        0,
    )
    assert on["fallback_calls"] == 0 and on["replayed_calls"] == 3 * on["captured_calls"] > 0
    assert on["state_bytes"] > 0
    assert off["from_layer"] is None and "no-layer-reuse" in off["reason"]
    assert off["conditions_full"] == 4

    def evaluations(run_id: str) -> list[tuple]:
        return store_rows(
            store_path,
            "SELECT condition_id, task, metric, value, n FROM evaluations WHERE run_id = ? "
            "ORDER BY condition_id NULLS FIRST, task, metric",
            [run_id],
        )

    def items(run_id: str) -> list[tuple]:
        return store_rows(
            store_path,
            "SELECT condition_id, task, item_index, prediction, choice_loglik, target_loglik "
            "FROM evaluation_items WHERE run_id = ? ORDER BY condition_id NULLS FIRST, task, "
            "item_index",
            [run_id],
        )

    rows_on, rows_off = evaluations(reused), evaluations(full)
    # baseline + 4 conditions, each: hellaswag acc/acc_norm, lambada acc/perplexity,
    # perplexity perplexity/nll/tokens
    assert len(rows_on) == 5 * 7
    assert rows_on == rows_off  # the same numbers, exactly
    conditions = {r[0] for r in rows_on if r[0] is not None}
    base = {(r[1], r[2]): r[3] for r in rows_on if r[0] is None}
    # The perturbations (scale -3 in layer 1) changed what was measured: not a replayed output.
    for cond in conditions:
        nll = [r[3] for r in rows_on if r[0] == cond and r[2] == "nll"]
        assert nll and nll[0] != base[("perplexity", "nll")]
    assert items(reused) == items(full) and len(items(reused)) == 5 * 24


def test_a_bad_reuse_budget_is_refused_before_anything_is_registered(
    cli, tiny_world, store_path
) -> None:
    score = _ok(cli("--json", "score", "--model", str(tiny_world["model"]), "--data",
                    str(tiny_world["text"]), "--n-samples", "4", "--seq-len", "16"))  # fmt: skip
    rank_id = _ok(cli("--json", "rank", score["runs"][0]["run_id"], "-k", "50"))["runs"][0]
    before = store_rows(store_path, "SELECT run_id FROM runs ORDER BY run_id")
    for budget in ("0", "-1", "nan"):
        result = cli("perturb", rank_id["run_id"], "--layer-reuse-budget", budget)
        assert result.exit_code != 0
        assert "--layer-reuse-budget must be a positive number of GiB" in result.output
    assert store_rows(store_path, "SELECT run_id FROM runs ORDER BY run_id") == before
