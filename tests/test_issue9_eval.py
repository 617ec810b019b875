"""Issue 9, defects 2, 3 and 7: the evaluation reuse key, perplexity on a file, per-item records.

* Two model folders with the same weights whose tokenizers differ (one prepends BOS) never
  share a stored evaluation; a bumped evaluation-engine version invalidates stored results.
* Perplexity on a dedicated file scores the whole file; on the calibration text of the run
  evaluated, only its held-out tail (and says so); the scored token count is stored.
* ``evaluation_items`` holds one row per HellaSwag / LAMBADA item, consistent with the
  aggregates and with an independent log-likelihood computation; ``flipped_items`` lists per
  perturbation condition the items whose prediction changed; ``--no-items`` stores none.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cwa.store import Store


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _rows(store_path: Path, sql: str, params=None) -> list[tuple]:
    with Store(store_path).read() as con:
        return con.execute(sql, params or []).fetchall()


def named_query(name: str) -> str:
    """The SQL under ``-- name: NAME`` in examples/queries.sql."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "queries.sql").read_text()
    body = text.split(f"-- name: {name}\n", 1)[1].split("-- name: ", 1)[0]
    return "\n".join(line for line in body.splitlines() if not line.startswith("--"))


def bos_variant(src: Path, dest: Path) -> Path:
    """A copy of a model folder whose tokenizer prepends BOS (<eos>, id 1); same weights."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<eos> $A", pair="<eos> $A <eos> $B", special_tokens=[("<eos>", 1)]
    )
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def bos_folder(tiny_world, tmp_path_factory) -> Path:
    return bos_variant(tiny_world["model"], tmp_path_factory.mktemp("bos") / "model")


def _evaluate(cli, model: Path, tasks: str, *extra: str) -> dict:
    return _ok(cli("--json", "evaluate", "--model", str(model), "--tasks", tasks, *extra))


# -- defect 2: the reuse key -------------------------------------------------------------------


def test_folders_differing_only_in_tokenizer_never_share_results(
    cli, tiny_world, bos_folder, tmp_path
) -> None:
    tasks = f"lambada:{tiny_world['lambada']},perplexity:{tiny_world['text']}"
    plain = _evaluate(cli, tiny_world["model"], tasks)
    with_bos = _evaluate(cli, bos_folder, tasks)
    assert all(r["reused_from"] is None for r in with_bos["results"])
    value = {(r["task"], r["metric"]): r["value"] for r in plain["results"]}
    value_bos = {(r["task"], r["metric"]): r["value"] for r in with_bos["results"]}
    assert value[("lambada", "perplexity")] != value_bos[("lambada", "perplexity")]
    # An identical copy of the plain folder does reuse (the key is about content, not path).
    copy = tmp_path / "copy"
    shutil.copytree(tiny_world["model"], copy)
    again = _evaluate(cli, copy, tasks)
    assert {r["reused_from"] for r in again["results"]} == {plain["run_id"]}
    # ... and so does the BOS folder itself, second time round, from its own run.
    again_bos = _evaluate(cli, bos_folder, tasks)
    assert {r["reused_from"] for r in again_bos["results"]} == {with_bos["run_id"]}


def test_bumped_engine_version_invalidates_stored_results(cli, tiny_world, monkeypatch) -> None:
    import cwa.evaluation.identity as identity

    tasks = f"lambada:{tiny_world['lambada']}"
    first = _evaluate(cli, tiny_world["model"], tasks)
    reused = _evaluate(cli, tiny_world["model"], tasks)
    assert {r["reused_from"] for r in reused["results"]} == {first["run_id"]}
    monkeypatch.setattr(identity, "EVAL_ENGINE_VERSION", identity.EVAL_ENGINE_VERSION + ".next")
    bumped = _evaluate(cli, tiny_world["model"], tasks)
    assert all(r["reused_from"] is None for r in bumped["results"])


def test_the_key_covers_dtype_and_attention(tiny_world) -> None:
    from cwa.evaluation.identity import evaluation_key
    from cwa.models.loading import load_model

    base = load_model(str(tiny_world["model"]), dtype="float32", device="cpu")
    eager = load_model(
        str(tiny_world["model"]), dtype="float32", device="cpu", attn_implementation="eager"
    )
    half = load_model(str(tiny_world["model"]), dtype="bfloat16", device="cpu")
    keys = {evaluation_key(m) for m in (base, eager, half)}
    assert base.attn_implementation != eager.attn_implementation
    assert len(keys) == 3


# -- defect 3: perplexity on a file ------------------------------------------------------------


def _stream(tokenizer, path: Path) -> list[int]:
    from cwa.data.text import load_text_file, token_stream

    return token_stream(tokenizer, load_text_file(path)).tolist()


def _windows_scored(n_tokens: int, seq_len: int) -> int:
    return sum(
        min(seq_len, n_tokens - b) - 1
        for b in range(0, n_tokens, seq_len)
        if min(seq_len, n_tokens - b) >= 2
    )


def test_perplexity_whole_file_unless_it_is_the_calibration_text(
    cli, tiny_world, store_path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world["model"])
    stream = _stream(tok, tiny_world["text"])
    tasks = f"perplexity:{tiny_world['text']}"
    whole = _evaluate(cli, tiny_world["model"], tasks, "--seq-len", "32")
    tokens = {r["metric"]: r for r in whole["results"]}["tokens"]
    assert tokens["value"] == _windows_scored(len(stream), 32)  # every window of the file
    assert tokens["note"] is None
    # Calibrate on the same file, then evaluate that score run's model: held-out tail only.
    score = _ok(
        cli(
            "--json",
            "score",
            "--model",
            str(tiny_world["model"]),
            "--data",
            str(tiny_world["text"]),
            "--n-samples",
            "4",
            "--seq-len",
            "16",
            "--heldout-fraction",
            "0.2",
        )
    )["runs"][0]["run_id"]
    held = cli("evaluate", score, "--tasks", tasks, "--seq-len", "32")
    assert held.exit_code == 0, held.stderr
    assert "held-out part only: the last 20%" in held.stdout and score in held.stdout
    cut = math.floor(len(stream) * 0.8)
    stored = _rows(
        store_path,
        "SELECT value, note FROM evaluations WHERE metric = 'tokens' AND run_id = "
        "(SELECT max(run_id) FROM runs WHERE stage = 'evaluate')",
    )
    assert stored[0][0] == _windows_scored(len(stream) - cut, 32)
    assert "calibration text of run" in stored[0][1]


# -- defect 7: per-item records ----------------------------------------------------------------


def _harness_loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Independent: encode context and context+continuation, sum log-softmax by hand."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(len(ctx) - 1, len(whole) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(positions, cont, strict=True))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont, strict=True))
    return total, greedy


def test_items_match_aggregates_and_a_hand_computation(cli, tiny_world, store_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwa.evaluation.hellaswag import item_from_record
    from cwa.evaluation.lambada import split_text

    tasks = f"hellaswag:{tiny_world['hellaswag']},lambada:{tiny_world['lambada']}"
    out = _evaluate(cli, tiny_world["model"], tasks, "--items")
    agg = {(r["task"], r["metric"]): r["value"] for r in out["results"]}
    items = out["items"]
    hs = [i for i in items if i["task"] == "hellaswag"]
    lb = [i for i in items if i["task"] == "lambada"]
    assert [i["item_index"] for i in hs] == list(range(12)) == [i["item_index"] for i in lb]
    assert sum(i["acc"] for i in hs) / 12 == pytest.approx(agg[("hellaswag", "acc")])
    assert sum(i["acc_norm"] for i in hs) / 12 == pytest.approx(agg[("hellaswag", "acc_norm")])
    assert sum(i["acc"] for i in lb) / 12 == pytest.approx(agg[("lambada", "acc")])
    mean_ll = sum(i["target_loglik"] for i in lb) / 12
    assert math.exp(-mean_ll) == pytest.approx(agg[("lambada", "perplexity")], rel=1e-9)

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_world["model"])
    records = [json.loads(x) for x in Path(tiny_world["hellaswag"]).read_text().splitlines()]
    for row in hs[:3]:
        item = item_from_record(records[row["item_index"]], "")
        expected = [_harness_loglik(model, tok, item.query, " " + c)[0] for c in item.choices]
        assert row["choice_loglik"] == pytest.approx(expected, abs=1e-4)
        assert row["gold"] == item.gold
        assert row["prediction"] == int(torch.tensor(expected).argmax())
        assert row["acc"] == float(row["prediction"] == item.gold)
    texts = [json.loads(x)["text"] for x in Path(tiny_world["lambada"]).read_text().splitlines()]
    for row in lb[:3]:
        ll, greedy = _harness_loglik(model, tok, *split_text(texts[row["item_index"]]))
        assert row["target_loglik"] == pytest.approx(ll, abs=1e-4)
        assert row["greedy"] is greedy and row["prediction"] == int(greedy) and row["gold"] == 1
    stored = _rows(
        store_path, "SELECT count(*) FROM evaluation_items WHERE run_id = ?", [out["run_id"]]
    )
    assert stored[0][0] == 24


def test_no_items_stores_none(cli, tiny_world, store_path) -> None:
    out = _evaluate(cli, tiny_world["model"], f"lambada:{tiny_world['lambada']}", "--no-items")
    assert _rows(store_path, "SELECT count(*) FROM evaluation_items")[0][0] == 0
    assert out["results"]


def test_perturb_records_items_per_condition_and_flipped_items_view(
    cli, tiny_world, store_path
) -> None:
    score = _ok(
        cli(
            "--json",
            "score",
            "--model",
            str(tiny_world["model"]),
            "--data",
            str(tiny_world["text"]),
            "--n-samples",
            "4",
            "--seq-len",
            "16",
        )
    )["runs"][0]["run_id"]
    rank = _ok(cli("--json", "rank", score, "-k", "200"))["runs"][0]["run_id"]
    tasks = f"hellaswag:{tiny_world['hellaswag']},lambada:{tiny_world['lambada']}"
    run_id = _ok(
        cli(
            "--json",
            "perturb",
            rank,
            "--method",
            "scale",
            "--scale",
            "40",
            "--controls",
            "random_k",
            "--seeds",
            "0",
            "--eval",
            tasks,
        )
    )["runs"][0]["run_id"]
    items = _rows(
        store_path,
        "SELECT condition_id, task, item_index, prediction, acc FROM evaluation_items "
        "WHERE run_id = ?",
        [run_id],
    )
    conditions = [
        c
        for (c,) in _rows(
            store_path,
            "SELECT condition_id FROM perturbation_conditions WHERE run_id = ?",
            [run_id],
        )
    ]
    by = {}
    for cond, task, index, prediction, acc in items:
        by.setdefault(cond, {})[(task, index)] = (prediction, acc)
    assert set(by) == {None, *conditions} and all(len(v) == 24 for v in by.values())
    # Per-condition accuracy from the items equals the stored aggregate.
    for cond in conditions:
        (agg,) = _rows(
            store_path,
            "SELECT value FROM evaluations WHERE run_id = ? AND condition_id = ? AND "
            "task = 'hellaswag' AND metric = 'acc'",
            [run_id, cond],
        )
        hs = [acc for (task, _), (_, acc) in by[cond].items() if task == "hellaswag"]
        assert sum(hs) / len(hs) == pytest.approx(agg[0])
    flipped = _rows(
        store_path,
        "SELECT condition_id, task, item_index, baseline_prediction, prediction "
        "FROM flipped_items WHERE run_id = ?",
        [run_id],
    )
    expected = {
        (cond, task, index)
        for cond in conditions
        for (task, index), (prediction, _) in by[cond].items()
        if prediction != by[None][(task, index)][0]
    }
    assert {(c, t, i) for c, t, i, _, _ in flipped} == expected
    assert expected  # scaling 200 top weights by 40 flips some predictions
    # The named query in examples/queries.sql answers "which items did top_k flip".
    sql = named_query("topk_flipped_items")
    with Store(store_path).read() as con:
        answered = con.execute(sql).fetchall()
    top = {(c, t, i) for c, t, i in expected if c.startswith("top_k")}
    assert {(r[1], r[3], r[4]) for r in answered} == top
