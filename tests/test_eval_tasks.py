"""Evaluation engine and tasks, checked against plain one-item-at-a-time computations.

A tiny random GPT-2 and a byte-level BPE tokenizer trained on a few sentences stand in for a
real model; the reference log-likelihoods are computed here with one forward pass per request
and a Python loop over continuation tokens, independently of the batched engine.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from cwa.errors import DataError, InvalidInput, UnknownName
from cwa.evaluation.base import bootstrap_perplexity_stderr
from cwa.evaluation.engine import TokenRequest, encode_pairs, score_requests
from cwa.evaluation.hellaswag import HellaSwagTask, item_from_record, preprocess
from cwa.evaluation.runner import evaluate_model
from cwa.evaluation.tasks import plan_tasks

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park while the children played",
    "she mixes the flour in a bowl and pours it into a pan",
    "he opens the door , walks in and sits on the chair",
    "how to bake a cake . preheat the oven and wait",
    "the man is playing a guitar on the stage with friends",
]
N_POSITIONS = 48


def build_tokenizer(with_bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def build_model(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.2,
        embd_pdrop=0.2,
        attn_pdrop=0.2,
    )
    model = GPT2LMHeadModel(config)
    model.train()  # evaluation must switch dropout off by itself and restore the mode
    return model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(len(tok))


# -- the independent reference ---------------------------------------------------------------


def ref_encode(tokenizer, context: str, continuation: str):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def ref_loglik(model, ctx, cont, max_len=N_POSITIONS):
    was_training = model.training
    model.eval()
    full = (list(ctx) + list(cont))[-(max_len + 1) :]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inp).logits[0].float(), dim=-1)
    model.train(was_training)
    n_inp = len(full) - 1
    total, greedy = 0.0, True
    for j, token in enumerate(cont):
        row = logprobs[n_inp - len(cont) + j]
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def ref_pair(model, tokenizer, context, continuation):
    return ref_loglik(model, *ref_encode(tokenizer, context, continuation))


PAIRS = [
    ("the cat sat on the", " mat"),
    ("The cat sat  ", "on the mat"),  # trailing spaces move to the continuation
    ("a dog ran in the park", " while the zebrafish quietly hummed"),  # multi-token target
    ("how to bake a cake .", " preheat the oven"),
    ("she", " mixes"),
    (" ".join(SENTENCES), " the end"),  # longer than the model: left truncation
    ("he opens the door", " , walks in and sits on the chair and the cat"),
    ("x", " qwertyuiop"),
    ("the man is playing a guitar", " on the stage"),
    ("the man is playing a guitar", " with friends"),
    ("the children played\t ", "\tloudly"),
]


def requests_for(tokenizer, pairs):
    encoded = encode_pairs(tokenizer, pairs)
    return [TokenRequest(tuple(c), tuple(t), i // 2) for i, (c, t) in enumerate(encoded)]


# -- tokenization ----------------------------------------------------------------------------


def test_encode_pairs_matches_harness_rule(tok):
    for context, continuation in PAIRS:
        got = encode_pairs(tok, [(context, continuation)])[0]
        assert got == tuple(ref_encode(tok, context, continuation))
    ctx, cont = encode_pairs(tok, [("The cat sat  ", "on the mat")])[0]
    assert ctx == tok.encode("The cat sat")
    assert tok.decode(cont) == "  on the mat"
    assert max(len(c) for _, c in encode_pairs(tok, PAIRS)) >= 3


def test_bos_is_delegated_to_the_tokenizer():
    tok = build_tokenizer(with_bos=True)
    bos = tok.bos_token_id
    ctx, cont = encode_pairs(tok, [("the cat sat", " on the mat")])[0]
    assert ctx[0] == bos and bos not in cont
    assert ctx + cont == tok.encode("the cat sat on the mat")
    # harness < 0.4.9.2 behaviour on request: no special tokens
    ctx, cont = encode_pairs(tok, [("the cat sat", " on the mat")], add_bos_token=False)[0]
    assert (
        bos not in ctx
        and ctx + cont == tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    )
    # a string already starting with BOS gets no second one
    ctx, _ = encode_pairs(tok, [("<s>the cat sat", " on")])[0]
    assert ctx.count(bos) == 1
    # an empty context becomes the prefix (BOS) token
    ctx, cont = encode_pairs(tok, [("", " the cat")])[0]
    assert ctx == [bos] and cont == tok(" the cat", add_special_tokens=False)["input_ids"]


# -- batched scoring vs the plain loop -------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 16, 3])
def test_score_requests_match_plain_loop(tok, model, batch_size):
    requests = requests_for(tok, PAIRS)
    assert any(len(r.context) + len(r.continuation) > N_POSITIONS for r in requests)
    logliks, greedy = score_requests(model, requests, batch_size=batch_size)
    for req, ll, gr in zip(requests, logliks.tolist(), greedy.tolist(), strict=True):
        ref_ll, ref_gr = ref_loglik(model, req.context, req.continuation)
        assert ll == pytest.approx(ref_ll, abs=1e-5)
        assert gr == ref_gr
    assert model.training  # mode restored


class CopyModel(torch.nn.Module):
    """Predicts that the next token repeats the current one (to exercise is_greedy)."""

    def __init__(self, vocab: int, with_logits_to_keep: bool):
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(n_positions=64, vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        if not with_logits_to_keep:
            self.forward = self._forward_all  # type: ignore[method-assign]

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        logits = 5.0 * torch.nn.functional.one_hot(input_ids, self.vocab).float()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)

    def _forward_all(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=5.0 * torch.nn.functional.one_hot(input_ids, self.vocab))


@pytest.mark.parametrize("with_keep", [True, False])
def test_is_greedy_and_gather_offsets(with_keep):
    model = CopyModel(12, with_keep)
    requests = [
        TokenRequest((1, 2, 3), (3, 3), 0),  # greedy: every token repeats
        TokenRequest((1, 2, 3), (3, 4), 0),  # second token not greedy
        TokenRequest((5,) * 9 + (7,), (7,), 1),  # long context, short continuation
        TokenRequest((4,), (4, 4, 4, 4), 2),
        TokenRequest((9, 8), (1,), 3),
    ]
    lp_hit = 5.0 - math.log(math.exp(5.0) + 11)  # log-softmax of the favoured token
    lp_miss = -math.log(math.exp(5.0) + 11)
    expected = [2 * lp_hit, lp_hit + lp_miss, lp_hit, 4 * lp_hit, lp_miss]
    for bs in (1, 2, 16):
        logliks, greedy = score_requests(model, requests, batch_size=bs)
        assert logliks.tolist() == pytest.approx(expected, abs=1e-5)
        assert greedy.tolist() == [True, False, True, True, False]


# -- HellaSwag -------------------------------------------------------------------------------


def test_preprocess_by_hand():
    assert preprocess(" How to bake [title] Preheat the oven. ") == "How to bake. Preheat the oven."
    assert (
        preprocess("Making a cake: A woman  mixes flour [header] in a bowl. She then")
        == "Making a cake: A woman mixes flour in a bowl. She then"
    )
    item = item_from_record(
        {
            "activity_label": "Making a cake",
            "ctx_a": "A woman  mixes flour [header] in a bowl.",
            "ctx_b": "SHE then",
            "endings": ["pours it [step] into a pan.", " eats the bowl."],
            "label": "1",
        },
        "x line 1",
    )
    assert item.query == "Making a cake: A woman mixes flour in a bowl. She then"
    assert item.choices == ("pours it into a pan.", "eats the bowl.")
    assert item.gold == 1


HS_RECORDS = [
    {
        "activity_label": "Baking",
        "ctx_a": "A woman mixes the flour in a bowl.",
        "ctx_b": "she",
        "endings": ["pours it into a pan.", "sits on the chair.", "runs in the park.", "plays."],
        "label": "0",
    },
    {
        "activity_label": "Music",
        "ctx_a": "The man is playing a guitar [title] on the stage.",
        "ctx_b": "his friends",
        "endings": ["sing.", "open the door and walk in.", "bake a cake.", "look at the dog."],
        "label": 1,
    },
    {
        "activity_label": "Park",
        "ctx_a": "A dog ran in the park.",
        "ctx_b": "the children",
        "endings": ["played.", "zebrafish quietly hummed.", "sat.", "preheat the oven"],
        "label": 2,
    },
]
# acc and acc_norm choose differently: a 1-character choice against a long one
CRAFTED = {
    "activity_label": "Pets",
    "ctx_a": "The cat sat on the mat.",
    "ctx_b": "the dog",
    "endings": ["a", "looked at the cat and the children played in the park while she baked"],
    "label": 1,
}


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def hellaswag_reference(model, tok, records):
    accs, norms = [], []
    for rec in records:
        item = item_from_record(rec, "ref")
        lls = [ref_pair(model, tok, item.query, " " + c)[0] for c in item.choices]
        normed = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        accs.append(float(lls.index(max(lls)) == item.gold))
        norms.append(float(normed.index(max(normed)) == item.gold))
    return accs, norms


def sample_stderr(values):
    n = len(values)
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def rows_by_metric(rows, task):
    return {r["metric"]: r for r in rows if r["task"] == task}


def test_hellaswag_matches_reference(tok, model, tmp_path):
    records = HS_RECORDS + [CRAFTED]
    path = write_jsonl(tmp_path / "hs.jsonl", records)
    accs, norms = hellaswag_reference(model, tok, records)
    assert accs[-1] == 0.0 and norms[-1] == 1.0  # the crafted item: acc and acc_norm disagree
    for bs in (1, 16):
        rows = rows_by_metric(
            evaluate_model(model, tok, [f"hellaswag:{path}"], batch_size=bs), "hellaswag"
        )
        assert rows["acc"]["value"] == pytest.approx(sum(accs) / 4)
        assert rows["acc_norm"]["value"] == pytest.approx(sum(norms) / 4)
        assert rows["acc_norm"]["stderr"] == pytest.approx(sample_stderr(norms))
        assert rows["acc"]["n"] == 4


def test_acc_and_acc_norm_disagree_on_crafted_item(tok, model, tmp_path):
    path = write_jsonl(tmp_path / "crafted.jsonl", [CRAFTED])
    item = item_from_record(CRAFTED, "ref")
    lls = [ref_pair(model, tok, item.query, " " + c)[0] for c in item.choices]
    assert lls[0] > lls[1]  # the short choice has the higher summed log-likelihood ...
    assert lls[1] / len(item.choices[1]) > lls[0] / 1  # ... the long one per character
    rows = rows_by_metric(evaluate_model(model, tok, f"hellaswag:{path}"), "hellaswag")
    assert rows["acc"]["value"] == 0.0 and rows["acc_norm"]["value"] == 1.0
    assert rows["acc"]["stderr"] is None  # undefined for one item


# -- LAMBADA ---------------------------------------------------------------------------------

LAMBADA_TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "she mixes the flour in a bowl and pours it into a zebrafish",
    "he opens the door , walks in and sits on the chair",
    " ".join(SENTENCES[:4]) + " finally",  # longer than the model
    "guitar",  # one word: empty context -> prefix token
]


def test_lambada_matches_reference(tok, model, tmp_path):
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": t} for t in LAMBADA_TEXTS])
    lls, greedy = [], []
    for text in LAMBADA_TEXTS:
        words = text.split(" ")
        context, target = " ".join(words[:-1]), " " + words[-1]
        if context:
            ll, gr = ref_pair(model, tok, context, target)
        else:
            ll, gr = ref_loglik(model, [tok.eos_token_id], tok(target)["input_ids"])
        lls.append(ll)
        greedy.append(float(gr))
    for bs in (1, 16):
        rows = rows_by_metric(
            evaluate_model(model, tok, [f"lambada:{path}"], batch_size=bs), "lambada"
        )
        assert rows["perplexity"]["value"] == pytest.approx(
            math.exp(-sum(lls) / len(lls)), rel=1e-5
        )
        assert rows["acc"]["value"] == pytest.approx(sum(greedy) / len(greedy))
        assert rows["perplexity"]["n"] == len(LAMBADA_TEXTS)
        assert rows["perplexity"]["stderr"] == pytest.approx(
            bootstrap_perplexity_stderr(lls), rel=1e-6
        )


def test_bootstrap_perplexity_stderr_against_exact_enumeration():
    logliks = [-1.0, -2.5, -4.0, -0.5]
    # every one of the 4**4 resamples is equally likely: the exact bootstrap distribution
    stats = [
        math.exp(-sum(logliks[i] for i in idx) / 4) for idx in itertools.product(range(4), repeat=4)
    ]
    mu = sum(stats) / len(stats)
    exact = math.sqrt(sum((s - mu) ** 2 for s in stats) / len(stats))
    assert bootstrap_perplexity_stderr(logliks, iters=20_000) == pytest.approx(exact, rel=0.03)
    assert bootstrap_perplexity_stderr([-1.0]) is None


# -- perplexity ------------------------------------------------------------------------------


def write_corpus(path, n_lines=12):
    rng = random.Random(1)
    lines = [" ".join(rng.choice(SENTENCES).split()[: rng.randint(4, 11)]) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def stream_by_hand(tok, docs):
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            ids.append(tok.eos_token_id)
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
    return ids


def window_nll_by_hand(model, tokens):
    model.eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    model.train()
    return sum(-float(logprobs[t - 1, tokens[t]]) for t in range(1, len(tokens))), len(tokens) - 1


def _nll_of_windows(model, tokens, seq_len):
    total, count = 0.0, 0
    for begin in range(0, len(tokens), seq_len):
        window = tokens[begin : begin + seq_len]
        if len(window) >= 2:
            s, c = window_nll_by_hand(model, window)
            total, count = total + s, count + c
    return total, count


def test_perplexity_scores_the_whole_file_by_default(tok, model, tmp_path):
    # A dedicated evaluation file is scored in full (issue 9: it used to be its last 10%).
    lines = write_corpus(tmp_path / "notes.txt", n_lines=40)
    total, count = _nll_of_windows(model, stream_by_hand(tok, lines), 16)
    for bs in (1, 16):
        rows = rows_by_metric(
            evaluate_model(
                model, tok, [f"perplexity:{tmp_path / 'notes.txt'}"], seq_len=16, batch_size=bs
            ),
            "perplexity",
        )
        assert rows["tokens"]["value"] == count
        assert rows["nll"]["value"] == pytest.approx(total / count, abs=1e-5)
        assert rows["perplexity"]["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
        assert rows["tokens"]["note"] is None


def test_perplexity_heldout_fraction_scores_only_the_tail(tok, model, tmp_path):
    lines = write_corpus(tmp_path / "notes.txt", n_lines=40)
    stream = stream_by_hand(tok, lines)
    held = stream[math.floor(len(stream) * 0.75) :]  # the part calibration never uses
    total, count = _nll_of_windows(model, held, 16)
    plans = plan_tasks(f"perplexity:{tmp_path / 'notes.txt'}", seq_len=16, heldout_fraction=0.25)
    rows = rows_by_metric(evaluate_model(model, tok, plans), "perplexity")
    assert rows["tokens"]["value"] == count
    assert rows["nll"]["value"] == pytest.approx(total / count, abs=1e-5)
    assert "held-out part only: the last 25%" in rows["tokens"]["note"]


def test_perplexity_stride_follows_hf_guide(tok, model, tmp_path, monkeypatch):
    import cwa.toy

    lines = write_corpus(tmp_path / "held.txt", n_lines=10)
    monkeypatch.setattr(
        cwa.toy, "toy_data_path", lambda name, **kw: tmp_path / "held.txt", raising=False
    )
    stream = torch.tensor([stream_by_hand(tok, lines)])
    seq_len, stride = 24, 8
    # the Hugging Face perplexity guide's loop, with the model's own loss
    model.eval()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, stream.size(1), stride):
        end = min(begin + seq_len, stream.size(1))
        trg_len = end - prev_end
        input_ids = stream[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == stream.size(1):
            break
    model.train()
    assert n_tokens == stream.size(1) - 1  # every token but the first, once
    rows = rows_by_metric(
        evaluate_model(model, tok, "perplexity:toy", seq_len=seq_len, stride=stride),
        "perplexity",
    )
    assert rows["tokens"]["value"] == n_tokens
    assert rows["nll"]["value"] == pytest.approx(nll_sum / n_tokens, abs=1e-5)


# -- options, hashing, bad input -------------------------------------------------------------


def test_limit_subsamples_with_the_seed(tok, model, tmp_path):
    records = [dict(HS_RECORDS[i % 3], ctx_b=f"the children {i}") for i in range(12)]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    (plan,) = plan_tasks(f"hellaswag:{path}", limit=5, seed=7)
    chosen = HellaSwagTask().load(plan)
    expected = sorted(random.Random(7).sample(range(12), 5))
    assert [c.query for c in chosen] == [item_from_record(records[i], "").query for i in expected]
    a = evaluate_model(model, tok, f"hellaswag:{path}", limit=5, seed=7)
    b = evaluate_model(model, tok, f"hellaswag:{path}", limit=5, seed=7)
    assert a == b and all(r["n"] == 5 for r in a)


def test_task_config_hash(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", HS_RECORDS)
    copy = tmp_path / "sub"
    copy.mkdir()
    moved = write_jsonl(copy / "other_name.jsonl", HS_RECORDS)
    changed = write_jsonl(tmp_path / "changed.jsonl", HS_RECORDS[:2])

    def h(spec, **kw):
        return plan_tasks(spec, **kw)[0].config_hash

    base = h(f"hellaswag:{path}")
    assert len(base) == 64 and base == h(f"hellaswag:{path}")
    assert h(f"hellaswag:{moved}") == base  # content, not path
    assert h(f"hellaswag:{changed}") != base
    assert h(f"hellaswag:{path}", seed=3) == base  # no limit: the seed changes nothing
    assert h(f"hellaswag:{path}", limit=2) != base
    assert h(f"hellaswag:{path}", limit=2, seed=1) != h(f"hellaswag:{path}", limit=2, seed=2)
    assert h(f"hellaswag:{path}", add_bos_token=False) != base
    assert h(f"hellaswag:{path}", seq_len=32) == base  # not a HellaSwag option
    notes = tmp_path / "n.txt"
    notes.write_text("some text here\n", encoding="utf-8")
    assert h(f"perplexity:{notes}", seq_len=32) != h(f"perplexity:{notes}", seq_len=64)
    assert h(f"perplexity:{notes}", stride=4) != h(f"perplexity:{notes}")


def test_default_sources(tmp_path, monkeypatch):
    import cwa.toy

    files = {}
    for name in ("hellaswag", "lambada", "heldout"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text('{"text": "a b"}\n', encoding="utf-8")
    monkeypatch.setattr(cwa.toy, "toy_data_path", lambda name, **kw: files[name], raising=False)
    toy_plans = plan_tasks("perplexity,hellaswag,lambada", is_toy_model=True)
    assert [p.source.kind for p in toy_plans] == ["toy"] * 3
    assert toy_plans[1].source.location == str(files["hellaswag"])
    hub = plan_tasks(["perplexity", "hellaswag", "lambada:hf"], is_toy_model=False)
    assert [p.source.location for p in hub] == [
        "hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text",
        "hf:Rowan/hellaswag:validation",
        "hf:EleutherAI/lambada_openai:default:test",
    ]


def test_bad_input_errors(tmp_path, tok, model):
    bad = tmp_path / "bad.jsonl"
    record = dict(HS_RECORDS[0])
    del record["ctx_b"]
    write_jsonl(bad, [HS_RECORDS[1], record])
    with pytest.raises(DataError) as err:
        evaluate_model(model, tok, f"hellaswag:{bad}")
    assert "line 2" in str(err.value) and "'ctx_b'" in str(err.value)
    bad_label = write_jsonl(tmp_path / "label.jsonl", [dict(HS_RECORDS[0], label=7)])
    with pytest.raises(DataError, match="label"):
        evaluate_model(model, tok, f"hellaswag:{bad_label}")
    no_text = write_jsonl(tmp_path / "lam.jsonl", [{"text": "a b"}, {"passage": "c d"}])
    with pytest.raises(DataError, match="line 2.*'text'"):
        evaluate_model(model, tok, f"lambada:{no_text}")
    with pytest.raises(UnknownName) as unknown:
        plan_tasks("hellaswagg")
    assert "hellaswag" in str(unknown.value) and "perplexity" in str(unknown.value)
    with pytest.raises(InvalidInput, match="--limit"):
        plan_tasks(f"hellaswag:{bad}", limit=0)
    with pytest.raises(DataError, match="does not exist"):
        plan_tasks(f"lambada:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(InvalidInput, match="--stride"):
        plan_tasks("perplexity:hf", seq_len=8, stride=9)
    with pytest.raises(InvalidInput, match="--batch-size"):
        evaluate_model(model, tok, f"lambada:{no_text}", batch_size=0)
    with pytest.raises(DataError, match="malformed"):
        plan_tasks("hellaswag:hf:Rowan/hellaswag")


def test_evaluation_leaves_the_model_untouched(tok, model, tmp_path):
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": t} for t in LAMBADA_TEXTS[:3]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    evaluate_model(model, tok, f"lambada:{path}")
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_batches_keep_an_items_endings_together():
    from cwa.evaluation.engine import plan_batches

    rng = random.Random(0)
    requests = []
    for item in range(11):
        context = tuple(range(rng.randint(3, 30)))
        for _ in range(4):
            requests.append(TokenRequest(context, tuple(range(rng.randint(1, 6))), item))
    batches = plan_batches(requests, 16)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    assert all(len(b) <= 16 for b in batches) and len(batches) == 3
    for b in batches:  # whole items only
        items = {requests[i].group for i in b}
        assert sum(1 for r in requests if r.group in items) == len(b)
    # longest contexts first
    firsts = [min(len(requests[i].context) for i in b) for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    # an item larger than the batch is split, nothing else is
    assert [len(b) for b in plan_batches(requests[:8], 3)] == [3, 1, 3, 1]
