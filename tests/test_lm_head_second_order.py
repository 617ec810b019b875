"""Hessian-vector products through the chunked head's differentiable gradient (_HeadGradient)
equal those through full [batch, tokens, vocab] logits (float64 log-softmax): all parameters,
a tied head (GPT-2), non-uniform token weights, and the derivative w.r.t. those weights."""

from __future__ import annotations

import pytest
import torch
from test_scale_lm_head import VOCAB, _batch, _models, _reference_nll

import cwa.evaluation.lm_head as lm_head


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return _models()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 positions per chunk


def _vectors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for p in params]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("second_order", [True, False])
def test_hvp_and_weight_derivative_match_full_logits(
    models, small_chunks, name: str, second_order: bool
) -> None:
    from cwa.metrics.base import token_nll

    model = models[name]
    batch = _batch()
    params = list(model.parameters())  # GPT-2: wte is also the (tied) head weight
    vectors = _vectors(params)
    g = torch.Generator().manual_seed(9)

    def products(nll: torch.Tensor) -> list[torch.Tensor]:
        weights = torch.rand(nll.shape, generator=g, dtype=torch.float64).float()
        weights.requires_grad_(True)
        grads = torch.autograd.grad((nll * weights).sum(), params, create_graph=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vectors, strict=True))
        return list(torch.autograd.grad(dot, [*params, weights]))

    if second_order:
        with lm_head.second_order():
            nll, _ = token_nll(model, batch, torch.device("cpu"))
    else:
        nll, _ = token_nll(model, batch, torch.device("cpu"))
    got = products(nll)
    g.manual_seed(9)
    want = products(_reference_nll(model, batch).float())
    assert len(got) == len(params) + 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5)
    assert float(want[-1].abs().max()) > 1e-4  # d/d(token weight) is not trivially zero
    assert float(want[0].abs().max()) > 1e-4
