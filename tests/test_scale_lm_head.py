"""The chunked LM head gives the unchunked numbers: NLL, gradients, Hessian-vector products,
continuation log-likelihoods, greedy flags and window NLL, with chunks forced small."""

from __future__ import annotations

import pytest
import torch

import cwa.evaluation.lm_head as lm_head

VOCAB = 300


def _models() -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
            bos_token_id=1, eos_token_id=2,
        )
    )  # fmt: skip
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                   eos_token_id=2, attn_implementation="eager")
    )  # fmt: skip
    return {"llama": llama.eval(), "gpt2": gpt2.eval()}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return _models()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 positions per chunk


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _reference_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits through the model's own forward, NLL by hand (log-softmax in float64)."""
    from cwa.metrics.base import target_mask

    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits.double()
    logp = torch.log_softmax(logits, dim=-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    out = torch.zeros(ids.shape, dtype=torch.float64)
    out[:, :-1] = -logp
    return out * target_mask(am)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_token_nll_and_gradients_match_full_logits(models, small_chunks, name: str) -> None:
    from cwa.metrics.base import token_nll

    model = models[name]
    assert lm_head.split_model(model) is not None
    batch = _batch()
    nll, mask = token_nll(model, batch, torch.device("cpu"))
    ref = _reference_nll(model, batch)
    assert int(mask.sum()) > 7 * 3  # several chunks
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)

    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(nll.sum(), params)
    ref_grads = torch.autograd.grad(ref.sum(), params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)


def test_hessian_vector_product_through_checkpointed_chunks(models, small_chunks) -> None:
    from cwa.metrics.base import token_nll

    model = models["llama"]
    batch = _batch()
    params = [p for n, p in model.named_parameters() if "mlp" in n or "lm_head" in n]
    assert params
    g = torch.Generator().manual_seed(3)
    vectors = [torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for p in params]

    def hvp(loss: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vectors, strict=True))
        return list(torch.autograd.grad(dot, params))

    nll, _ = token_nll(model, batch, torch.device("cpu"))
    chunked = hvp(nll.sum())
    full = hvp(_reference_nll(model, batch).float().sum())
    for a, b in zip(chunked, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        assert float(b.abs().max()) > 0


def test_hooked_head_falls_back_to_the_model_forward(models) -> None:
    model = models["gpt2"]
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: None)
    try:
        assert lm_head.split_model(model) is None
    finally:
        handle.remove()
    assert lm_head.split_model(model) is not None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_continuations_and_windows_match_unchunked(
    models, small_chunks, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from cwa.evaluation import engine

    model = models[name]
    g = torch.Generator().manual_seed(5)

    def toks(n: int) -> tuple[int, ...]:
        return tuple(int(x) for x in torch.randint(3, VOCAB, (n,), generator=g))

    requests = [
        engine.TokenRequest(toks(5 + i % 4), toks(1 + i % 5), group=i // 4) for i in range(16)
    ]
    # One request whose continuation is the model's greedy choice, so is_greedy is exercised.
    ctx = toks(6)
    best = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    requests.append(engine.TokenRequest(ctx, (best,), group=99))
    windows = [engine.Window(torch.tensor(toks(9 + i)), score_from=i % 3) for i in range(5)]

    ll, greedy = engine.score_requests(model, requests, batch_size=5, max_length=64)
    nll, counts = engine.score_windows(model, windows, batch_size=2)
    monkeypatch.setattr(lm_head, "split_model", lambda m: None)  # the unchunked engine
    ref_ll, ref_greedy = engine.score_requests(model, requests, batch_size=5, max_length=64)
    ref_nll, ref_counts = engine.score_windows(model, windows, batch_size=2)

    torch.testing.assert_close(ll, ref_ll, rtol=1e-6, atol=1e-5)
    assert torch.equal(greedy, ref_greedy) and bool(greedy[-1])
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    # And against a hand computation of one request: sum of log-softmax of the continuation.
    req = requests[3]
    whole = torch.tensor([req.context + req.continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=whole).logits.double(), dim=-1)[0]
    start = len(req.context) - 1
    hand = sum(float(logp[start + i, t]) for i, t in enumerate(req.continuation))
    assert float(ll[3]) == pytest.approx(hand, abs=1e-4)


@pytest.mark.parametrize("path", ["second_order", "non_uniform"])
def test_checkpointed_and_recomputed_paths_match(models, small_chunks, path: str) -> None:
    """The checkpointed head (second_order) and the fused head's recompute for a non-uniform
    upstream gradient both give the full-logit gradients."""
    from cwa.metrics.base import token_nll

    model = models["gpt2"]
    batch = _batch()
    weights = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(9))
    if path == "non_uniform":
        nll, _ = token_nll(model, batch, torch.device("cpu"))
    else:
        with lm_head.second_order():
            nll, _ = token_nll(model, batch, torch.device("cpu"))
    params = list(model.parameters())
    grads = torch.autograd.grad((nll * weights).sum(), params)
    ref = torch.autograd.grad((_reference_nll(model, batch) * weights).sum(), params)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)
