"""Requests prepared once per (task plan, tokenizer) and reused across evaluations (sweeps).

Checks: a second evaluation of the same plan tokenizes nothing and still runs the model (a
changed weight changes the numbers, equal to a fresh evaluation with the cache emptied); a
different tokenizer object or different file content prepares again; distinct strings are
encoded once and give the same ids as encoding each string alone.
"""

from __future__ import annotations

import pytest
import torch
from test_eval_tasks import CRAFTED, HS_RECORDS, build_model, build_tokenizer, write_jsonl

from cwa.evaluation import engine, prepared
from cwa.evaluation.runner import evaluate_model
from cwa.evaluation.tasks import plan_tasks

pytestmark = pytest.mark.usefixtures("one_thread")
LAMBADA = [
    {"text": "the cat sat on the mat and looked at the dog"},
    {"text": "a dog ran in the park while the children played"},
    {"text": "he opens the door , walks in and sits on the chair"},
]


@pytest.fixture()
def world(tmp_path, monkeypatch):
    prepared.clear()
    tok = build_tokenizer()
    model = build_model(len(tok))
    hs = write_jsonl(tmp_path / "hs.jsonl", HS_RECORDS + [CRAFTED])
    lam = write_jsonl(tmp_path / "lam.jsonl", LAMBADA)
    calls = []
    real = engine.encode_pairs

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "encode_pairs", counting)
    yield tok, model, [f"hellaswag:{hs}", f"lambada:{lam}"], calls
    prepared.clear()


def _values(rows):
    return {(r["task"], r["metric"]): r["value"] for r in rows}


def test_second_evaluation_reuses_requests_and_reruns_the_model(world):
    tok, model, specs, calls = world
    plans = plan_tasks(specs)
    first = evaluate_model(model, tok, plans)
    assert len(calls) == 2 and prepared.cache_stats() == {"hits": 0, "misses": 2}
    again = evaluate_model(model, tok, plan_tasks(specs))  # plans made again: same hashes
    assert len(calls) == 2 and prepared.cache_stats() == {"hits": 2, "misses": 2}
    assert _values(again) == _values(first)

    with torch.no_grad():  # a "perturbation": the reused requests must meet the new weights
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    changed = evaluate_model(model, tok, plans)
    assert len(calls) == 2
    prepared.clear()
    fresh = evaluate_model(model, tok, plans)
    assert len(calls) == 4
    assert _values(changed) == pytest.approx(_values(fresh), abs=1e-12)
    ppl = ("lambada", "perplexity")
    assert _values(changed)[ppl] != pytest.approx(_values(first)[ppl], rel=1e-6)


def test_other_tokenizer_or_content_prepares_again(world, tmp_path):
    tok, model, specs, calls = world
    evaluate_model(model, tok, specs)
    assert len(calls) == 2
    other = build_tokenizer()  # equal but a different object: not trusted to be the same
    evaluate_model(model, other, specs)
    assert len(calls) == 4
    hs_path = specs[0].split(":", 1)[1]
    write_jsonl(tmp_path / "hs.jsonl", HS_RECORDS)  # the file changed: its hash changes
    evaluate_model(model, tok, [f"hellaswag:{hs_path}"])
    assert len(calls) == 5


def test_encode_texts_dedup_matches_one_by_one():
    tok = build_tokenizer()
    texts = ["the cat sat", "a dog ran", "the cat sat", "", "a dog ran", "the cat sat"]
    got = engine.encode_texts(tok, texts)
    assert got == [tok(t)["input_ids"] for t in texts]
    assert got[0] is not got[2]  # callers may mutate their lists
