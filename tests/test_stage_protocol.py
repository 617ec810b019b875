"""Validate -> register: every bad option of rank, perturb and evaluate is refused with one
`Error:` line and no run registered (the runs table is unchanged), including options that need
the model's architecture or dtype and the task files' contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli_checks import assert_error_is_last_line

from cwa.store import Store
from cwa.store.results import run_ids


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture
def ranked(cli, tiny_world, store_path) -> dict[str, str]:
    """A score run and two rank runs (global top 20; layer 0 only) on the tiny GPT-2."""
    out = _ok(cli("--json", "score", "--model", str(tiny_world["model"]), "--data",
                  str(tiny_world["text"]), "--n-samples", "4", "--seq-len", "16"))  # fmt: skip
    score = out["runs"][0]["run_id"]
    top = _ok(cli("--json", "rank", score, "-k", "20"))["runs"][0]["run_id"]
    layer0 = _ok(cli("--json", "rank", score, "-k", "20", "--layers", "0"))["runs"][0]["run_id"]
    return {"score": score, "rank": top, "layer0": layer0}


def _write_bad_tasks(root: Path) -> dict[str, Path]:
    hellaswag = root / "bad_hellaswag.jsonl"
    hellaswag.write_text(json.dumps({"ctx": "a cat", "endings": ["x", "y"]}) + "\n")  # no label
    lambada = root / "bad_lambada.jsonl"
    lambada.write_text(json.dumps({"words": "no text field"}) + "\n")
    return {"BAD_HS": hellaswag, "BAD_LAMBADA": lambada}


CASES = [
    # perturb: options that need the model (architecture, dtype) or the ranking
    (("perturb", "RANK", "--layers", "7"), "layer 7 is out of range"),
    (("perturb", "LAYER0", "--layers", "1"), "do not overlap the ranking's scope"),
    (("perturb", "RANK", "--heads", "0.9"), "head 9 is out of range"),
    (("perturb", "RANK", "--heads", "0-1"), "write LAYER.HEAD"),
    (("perturb", "RANK", "--method", "bit_flip", "--bit", "40"), "bit 40 does not exist"),
    (("perturb", "RANK", "--k-values", "21"), "re-rank with --topk 21"),
    (("perturb", "RANK", "--eval", "hellaswag:BAD_HS"), "label"),
    (("perturb", "RANK", "--eval", "lambada:BAD_LAMBADA"), "text"),
    (("perturb", "RANK", "--controls", "random_k,bottomk"), "did you mean 'bottom_k'"),
    (("perturb", "RANK", "--method", "gaussian_noise", "--scale", "-1"), "must be >= 0"),
    # rank
    (("rank", "SCORE", "--topk", "999999999"), "--topk all"),
    (("rank", "SCORE", "--topk", "many"), "--topk 'many': give a whole number"),
    (("rank", "SCORE", "--by", "square"), "--by 'square'"),
    (("rank", "SCORE", "--mode", "head", "--head-grouping", "pairs"), "unknown head grouping"),
    (("rank", "SCORE", "--layers", "5"), "layer 5 is out of range"),
    # evaluate: malformed task files fail before a run is registered
    (("evaluate", "--model", "MODEL", "--tasks", "hellaswag:BAD_HS"), "label"),
    (("evaluate", "--model", "MODEL", "--tasks", "lambada:BAD_LAMBADA"), "text"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_options_register_no_run(cli, tiny_world, store_path, tmp_path, ranked, args, message):
    names = {"RANK": ranked["rank"], "LAYER0": ranked["layer0"], "SCORE": ranked["score"],
             "MODEL": str(tiny_world["model"]), **_write_bad_tasks(tmp_path)}  # fmt: skip
    for placeholder, value in names.items():
        args = tuple(a.replace(placeholder, str(value)) for a in args)
    if args[0] == "perturb" and "--eval" not in args:
        args = (*args, "--eval", f"perplexity:{tiny_world['text']}")
    before = run_ids(Store(store_path))
    result = cli(*args)
    assert_error_is_last_line(result, message)
    assert run_ids(Store(store_path)) == before  # nothing registered, not even a failed run


def test_topk_all_is_clamped_with_a_warning(cli, ranked, store_path) -> None:
    result = cli("--json", "rank", ranked["score"], "--topk", "all", "--layers", "1",
                 "--components", "attn_o")  # fmt: skip
    out = _ok(result)
    assert "--topk all ranks every weight in scope" in result.stderr
    with Store(store_path).read() as con:
        ((n, config),) = con.execute(
            "SELECT (SELECT count(*) FROM ranked_weights WHERE run_id = r.run_id), config "
            "FROM runs r WHERE run_id = ?",
            [out["runs"][0]["run_id"]],
        ).fetchall()
    assert n == 32 * 32 + 32  # every attn_o weight and bias of layer 1 (n_embd = 32)
    config = json.loads(config)
    assert config["topk"] == n and config["topk_requested"] == "all"
