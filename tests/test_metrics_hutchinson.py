"""Hutchinson diagonal vs the exact Hessian diagonal of a micro model; attention checks; obd."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402

from cwa.errors import UnsupportedArchitecture  # noqa: E402
from cwa.metrics import score_model  # noqa: E402
from cwa.metrics.base import double_backward_attention  # noqa: E402
from cwa.models.architecture import build_architecture_map  # noqa: E402
from cwa.scorefile import load_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_model(attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=8,
        n_layer=1,
        n_head=2,
        vocab_size=16,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():  # larger weights: a Hessian with real structure
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def calibration():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 16, (4, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 6:] = 0
    return ids, mask


def exact_hessian_diagonal(model, ids, mask):
    """diag(H) of the mean next-token NLL, one basis vector (Hessian row) at a time."""
    model.eval()
    params = list(model.parameters())
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits, dim=-1)
    pairs = mask[:, :-1].bool() & mask[:, 1:].bool()  # padding is never a target
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    loss = nll[pairs].mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    diagonal = torch.empty(flat.numel())
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        diagonal[i] = torch.cat([r.reshape(-1) for r in row])[i]
    return diagonal


@pytest.fixture(scope="module")
def micro_setup():
    model = micro_model()
    ids, mask = calibration()
    return model, ids, mask


def estimate(model, ids, mask, probes, path, seed=0, batches=None):
    arch = build_architecture_map(model)
    batches = batches or [{"input_ids": ids, "attention_mask": mask}]
    outcome = score_model(
        model, batches, "hutchinson_diag", arch=arch, out_path=path, probes=probes, seed=seed
    )
    scores = load_scores(path)
    return outcome, torch.cat([scores[n].reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.slow
def test_hutchinson_matches_exact_diagonal_and_error_shrinks(micro_setup, tmp_path):
    model, ids, mask = micro_setup
    exact = exact_hessian_diagonal(model, ids, mask)
    assert 1000 <= exact.numel() <= 5000
    _, few = estimate(model, ids, mask, 25, tmp_path / "few")
    outcome, many = estimate(model, ids, mask, 600, tmp_path / "many")
    pearson = np.corrcoef(many.numpy(), exact.numpy())[0, 1]
    assert pearson >= 0.95, pearson
    error_few = float((few - exact).abs().mean())
    error_many = float((many - exact).abs().mean())
    assert error_many < 0.5 * error_few  # ~ 1/sqrt(probes): expected ratio ~0.2
    assert outcome.config["probes"] == 600
    assert outcome.config["attention"] == "eager"


def test_batches_split_gives_the_same_estimate(micro_setup, tmp_path):
    # The same z per probe on every batch, batch losses weighted by 1/N: splitting the set
    # into batches of unequal size must not change the estimate (up to rounding).
    model, ids, mask = micro_setup
    _, whole = estimate(model, ids, mask, 3, tmp_path / "a")
    split = [
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
        {"input_ids": ids[1:], "attention_mask": mask[1:]},
    ]
    _, parts = estimate(model, ids, mask, 3, tmp_path / "b", batches=split)
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("components", [None, ["attn_q", "mlp_down"]])
def test_single_probe_is_z_times_hessian_vector_product(micro_setup, tmp_path, components):
    # One probe: the estimate is exactly z * Hz for ONE z over all selected weights (zero on
    # elements outside the selection), checked against an independent double backward.
    from cwa.metrics.base import cpu_generator, rademacher  # the probe's documented seeding

    model, ids, mask = micro_setup
    arch = build_architecture_map(model)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    outcome = score_model(model, batches, "hutchinson_diag", arch=arch, out_path=tmp_path / "p",
                          probes=1, seed=5, components=components)  # fmt: skip
    scores = load_scores(tmp_path / "p")
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    z = []
    for name, param in zip(names, params, strict=True):
        vector = rademacher(param.shape, cpu_generator(5, "hutchinson", 0, name))
        scope = arch.scope_mask(name, components=components) if components else None
        if name not in outcome.parameters:
            vector = torch.zeros_like(vector)
        elif scope is not None:
            vector = vector * scope
        z.append(vector)
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits, dim=-1)
    pairs = mask[:, :-1].bool() & mask[:, 1:].bool()
    loss = (-logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0])[pairs].mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, z, strict=True))
    hz = torch.autograd.grad(dot, params)
    for name, vector, product in zip(names, z, hz, strict=True):
        if name not in outcome.parameters:
            assert name not in scores
            continue
        expected = vector * product
        scope = arch.scope_mask(name, components=components) if components else None
        if scope is not None:  # out-of-scope elements are stored as NaN
            assert torch.isnan(scores[name][~scope]).all()
            expected = torch.where(scope, expected, scores[name])
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_obd_is_half_diagonal_times_weight_squared(micro_setup, tmp_path):
    model, ids, mask = micro_setup
    arch = build_architecture_map(model)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    score_model(model, batches, "hutchinson_diag", arch=arch, out_path=tmp_path / "h", probes=2)
    score_model(model, batches, "obd", arch=arch, out_path=tmp_path / "o", probes=2)
    hutch, obd = load_scores(tmp_path / "h"), load_scores(tmp_path / "o")
    for name, param in model.named_parameters():
        torch.testing.assert_close(obd[name], 0.5 * hutch[name] * param.detach() ** 2)


def test_sdpa_model_runs_on_math_backend(tmp_path):
    model = micro_model(attn="sdpa")
    ids, mask = calibration()
    outcome, _ = estimate(model, ids, mask, 1, tmp_path / "s")
    assert outcome.config["attention"] == "sdpa (math backend)"


def test_unsupported_attention_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(UnsupportedArchitecture, match="eager"):
        with double_backward_attention(model):
            pass
