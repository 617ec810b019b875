"""Shared-context scoring (context once, endings from its KV cache) against a hand loop.

The reference runs one plain forward per request over ``context + continuation[:-1]`` with the
model's full logits and ``log_softmax``; the shared path must give the same log-likelihoods
(float32 rounding) and the same greedy flags, and must actually be taken.
"""

from __future__ import annotations

import pytest
import torch

from cwa.evaluation import prefix_cache
from cwa.evaluation.engine import TokenRequest, score_requests
from cwa.evaluation.prefix_cache import shared_members, supports_prefix_cache

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 50
N_POSITIONS = 40


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_POSITIONS,
    )
    return LlamaForCausalLM(config).eval()


def _requests() -> list[TokenRequest]:
    """Items with 2-4 endings of different lengths, contexts of 2-20 tokens, two items with
    the same context, and one item long enough to be truncated to the model length."""
    gen = torch.Generator().manual_seed(3)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(2, VOCAB, (n,), generator=gen).tolist())

    requests: list[TokenRequest] = []
    shared = ids(7)
    for item, (ctx_len, n_endings) in enumerate(
        [(2, 4), (9, 4), (20, 3), (5, 2), (13, 4), (3, 4), (11, 2)]
    ):
        ctx = ids(ctx_len)
        for _ in range(n_endings):
            requests.append(
                TokenRequest(ctx, ids(int(torch.randint(1, 7, (1,), generator=gen))), item)
            )
    for item in (7, 8):  # identical contexts in two items
        requests += [TokenRequest(shared, ids(3), item), TokenRequest(shared, ids(5), item)]
    long_ctx = ids(N_POSITIONS - 2)  # context + ending > model length: truncated on the left
    requests += [TokenRequest(long_ctx, ids(4), 9), TokenRequest(long_ctx, ids(2), 9)]
    return requests


def _with_greedy_endings(model, requests):
    """Add to every item a 2-token ending decoded greedily, so some requests are greedy."""
    out = list(requests)
    seen = set()
    with torch.no_grad():
        for req in requests:
            if req.group in seen or len(req.context) > N_POSITIONS - 4:
                continue
            seen.add(req.group)
            seq = list(req.context)
            for _ in range(2):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(TokenRequest(req.context, tuple(seq[-2:]), req.group))
    return out


def _hand_loop(model, requests):
    lls, greedy = [], []
    with torch.no_grad():
        for req in requests:
            whole = (req.context + req.continuation)[-(N_POSITIONS + 1) :]
            inp = torch.tensor([whole[:-1]])
            logp = model(input_ids=inp).logits[0].float().log_softmax(-1)
            n = len(req.continuation)
            rows = logp[-n:]
            target = torch.tensor(req.continuation)
            lls.append(float(rows.gather(1, target[:, None]).sum()))
            greedy.append(bool((rows.argmax(-1) == target).all()))
    return lls, greedy


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [4, 16])
def test_shared_context_scores_match_hand_loop(build, batch_size, monkeypatch):
    model = build()
    requests = _with_greedy_endings(model, _requests())
    calls = []
    real = prefix_cache.score_shared_batch

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix_cache, "score_shared_batch", spy)
    lls, greedy = score_requests(model, requests, batch_size=batch_size)
    ref_ll, ref_greedy = _hand_loop(model, requests)
    assert lls.tolist() == pytest.approx(ref_ll, abs=2e-5)
    assert greedy.tolist() == ref_greedy
    assert any(ref_greedy) and not all(ref_greedy)  # the greedy check can fail either way
    # Every request but the truncated item's (and, with small batches, an item's request
    # left alone in a batch) goes through the shared path.
    assert sum(calls) >= len(requests) - 2 - (len(requests) // batch_size if batch_size < 5 else 0)
    plain, plain_greedy = score_requests(model, requests, batch_size=batch_size,
                                         share_contexts=False)  # fmt: skip
    assert lls.tolist() == pytest.approx(plain.tolist(), abs=2e-5)
    assert greedy.tolist() == plain_greedy.tolist()


def test_model_forward_path_without_chunked_head(monkeypatch):
    """A hook on the LM head sends scoring through the model's own forward (logits)."""
    model = _gpt2()
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: None)
    try:
        requests = [r for r in _requests() if r.group != 9]
        lls, greedy = score_requests(model, requests, batch_size=8)
        ref_ll, ref_greedy = _hand_loop(model, requests)
    finally:
        handle.remove()
    assert lls.tolist() == pytest.approx(ref_ll, abs=2e-5)
    assert greedy.tolist() == ref_greedy


def test_shared_members_rules():
    a = TokenRequest((5, 6, 7), (8,), 0)
    b = TokenRequest((5, 6, 7), (9, 10), 0)
    c = TokenRequest((4, 6), (9,), 1)
    assert shared_members([a, b, c], 40) == [0, 1]  # c shares nothing: plain path
    assert shared_members([c, a], 40) == []
    a2 = TokenRequest((5, 6, 7), (11,), 0)
    assert shared_members([a, b, a2], 3) == [0, 2]  # b would be truncated to the model length
    assert shared_members([a, b], 3) == []  # ... and a is then alone
    one = TokenRequest((5,), (8,), 2)
    assert shared_members([one, TokenRequest((5,), (9,), 2)], 40) == []  # no prefix to cache


def test_unsupported_architecture_uses_plain_path(monkeypatch):
    model = _gpt2()
    assert supports_prefix_cache(model)
    monkeypatch.setattr(model.config, "model_type", "some_new_arch")
    assert not supports_prefix_cache(model)

    def fail(*args, **kwargs):
        raise AssertionError("shared path used for an unsupported model")

    monkeypatch.setattr(prefix_cache, "score_shared_batch", fail)
    requests = [r for r in _requests() if r.group < 3]
    lls, _ = score_requests(model, requests, batch_size=8)
    ref_ll, _ = _hand_loop(model, requests)
    assert lls.tolist() == pytest.approx(ref_ll, abs=2e-5)
