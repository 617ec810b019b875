"""The real toy model (built once per session): task accuracy, perplexity, cache reuse.

Scoring here is deliberately plain and independent of ``cwa.toy.train``: one item at a time,
one forward pass per (context, continuation), lm-eval's definitions re-derived in the test.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _toy_fixture import toy_cache_dir, toy_model_path  # noqa: F401  (session fixtures)

import cwa.toy.cache as toy_cache
from cwa.toy import ensure_toy_model, toy_data_path, toy_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(toy_model_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(toy_model_path))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(toy_model_path))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _continuation(model, tok, context: str, continuation: str):
    """(log-probabilities of the continuation's tokens, their greedy predictions, targets)."""
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert full[: len(ctx_ids)] == ctx_ids  # the context tokenizes the same on its own
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(full[len(ctx_ids):])
    rows = logprobs[len(ctx_ids) - 1: len(full) - 1]
    return rows[torch.arange(len(targets)), targets], rows.argmax(-1), targets


def test_lambada_style_accuracy(loaded, toy_cache_dir):  # noqa: F811
    model, tok = loaded
    items = _jsonl(toy_data_path("lambada", cache_dir=toy_cache_dir))
    hits = 0
    for item in items:
        context, word = item["text"].rsplit(" ", 1)
        _, greedy, targets = _continuation(model, tok, context, " " + word)
        hits += int(torch.equal(greedy, targets))
    accuracy = hits / len(items)
    assert accuracy >= 0.6, accuracy
    recorded = json.loads((toy_model_path_of(toy_cache_dir) / "cwa_toy.json").read_text())
    assert abs(recorded["lambada_acc"] - accuracy) <= 0.01


def test_hellaswag_style_accuracy(loaded, toy_cache_dir):  # noqa: F811
    model, tok = loaded
    items = _jsonl(toy_data_path("hellaswag", cache_dir=toy_cache_dir))
    hits = 0
    for item in items:
        query = item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize()
        scores = [float(_continuation(model, tok, query, " " + e)[0].sum())
                  for e in item["endings"]]
        hits += int(max(range(4), key=scores.__getitem__) == int(item["label"]))
    accuracy = hits / len(items)
    assert accuracy >= 0.6, accuracy
    recorded = json.loads((toy_model_path_of(toy_cache_dir) / "cwa_toy.json").read_text())
    assert abs(recorded["hellaswag_acc"] - accuracy) <= 0.01


def toy_model_path_of(cache_dir):
    return toy_cache.toy_cache_dir(cache_dir) / f"gpt2-v{toy_cache.GENERATOR_VERSION}"


def test_heldout_stream_perplexity_is_low_at_every_position(loaded, toy_cache_dir):  # noqa: F811
    """Held-out documents joined by EOS into full-length windows, as evaluation streams are."""
    model, tok = loaded
    n_pos = model.config.n_positions
    assert n_pos == tok.model_max_length == 128
    docs = toy_data_path("heldout", cache_dir=toy_cache_dir).read_text().splitlines()[:300]
    stream: list[int] = []
    for k, doc in enumerate(docs):
        if k:
            stream.append(tok.eos_token_id)
        stream += tok(doc, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(stream[: len(stream) // n_pos * n_pos]).view(-1, n_pos)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)
    nll = -logprobs.gather(-1, windows[:, 1:, None])[..., 0]
    assert math.exp(nll.mean().item()) < 6.0  # uniform guessing would be len(tok) ~ 900
    # the late positions (only trained on packed rows) are as good as the early ones
    assert nll[:, 96:].mean() < nll[:, :32].mean()


def test_second_call_uses_the_cache(toy_model_path, toy_cache_dir, monkeypatch):  # noqa: F811
    def no_build(*args, **kwargs):
        raise AssertionError("the cached toy model was rebuilt")

    monkeypatch.setattr(toy_cache, "_build_for_cache", no_build)
    assert ensure_toy_model("gpt2", cache_dir=toy_cache_dir) == toy_model_path
    info = toy_info(toy_cache_dir)["models"]["gpt2"]
    assert info["built"] and not info["stale"]
    figures = info["figures"]
    assert figures["final_loss"] < 1.5 and figures["config"]["seed"] == 0
