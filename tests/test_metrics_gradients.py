"""grad_x_weight and grad_squared against independent full-batch / per-example computations."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402

from cwa.errors import NonFiniteError  # noqa: E402
from cwa.metrics import METRICS, score_model  # noqa: E402
from cwa.metrics.base import MetricSpec  # noqa: E402
from cwa.models.architecture import build_architecture_map  # noqa: E402
from cwa.scorefile import load_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-zero biases so every parameter has a non-trivial score
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def calibration():
    """Five sequences, two right-padded, in two batches of unequal size."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 32, (5, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]
    return ids, mask, batches


def mean_nll(model, ids, mask):
    """Plain definition: mean -log p(token t+1 | ..t) over pairs of real tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    terms = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                terms.append(-logp[b, t, ids[b, t + 1]])
    return torch.stack(terms).mean(), len(terms)


def test_grad_x_weight_equals_full_batch_gradient(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    ids, mask, batches = calibration()
    outcome = score_model(
        model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "s.safetensors"
    )
    scores = load_scores(outcome.score_path)

    model.eval()
    names, params = zip(*model.named_parameters(), strict=True)
    loss, count = mean_nll(model, ids, mask)
    grads = torch.autograd.grad(loss, params)
    assert outcome.n_tokens == count == 9 + 5 + 9 + 9 + 2
    assert outcome.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert list(scores) == list(names)
    for name, param, grad in zip(names, params, grads, strict=True):
        torch.testing.assert_close(
            scores[name], (param * grad).abs().detach(), rtol=1e-4, atol=1e-9
        )
    # Gradients are not left behind and every module is back in its own mode.
    assert all(p.grad is None for p in params)


def test_grad_squared_equals_per_example_loop(tmp_path):
    model = tiny_gpt2(seed=1)
    arch = build_architecture_map(model)
    ids, mask, batches = calibration()
    outcome = score_model(
        model, batches, "grad_squared", arch=arch, out_path=tmp_path / "s.safetensors"
    )
    scores = load_scores(outcome.score_path)
    assert outcome.config["example"] == "sequence"
    assert outcome.config["n_examples"] == 5

    model.eval()
    names, params = zip(*model.named_parameters(), strict=True)
    expected = [torch.zeros_like(p) for p in params]
    summed = [torch.zeros_like(p) for p in params]
    for row in range(ids.shape[0]):
        loss, _ = mean_nll(model, ids[row : row + 1], mask[row : row + 1])
        for acc, total, grad in zip(
            expected, summed, torch.autograd.grad(loss, params), strict=True
        ):
            acc += grad**2
            total += grad
    for name, acc in zip(names, expected, strict=True):
        torch.testing.assert_close(scores[name], acc / 5, rtol=1e-4, atol=1e-10)
    # Sanity: the empirical Fisher is not the square of the mean gradient.
    name = "transformer.h.0.mlp.c_fc.weight"
    index = names.index(name)
    assert not torch.allclose(scores[name], (summed[index] / 5) ** 2, rtol=1e-2)


def test_dropout_model_gives_identical_scores_twice(tmp_path):
    model = tiny_gpt2(dropout=0.5)
    model.train()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    first = score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "a")
    second = score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert first.loss == second.loss
    assert model.training and all(m.training for m in model.modules())  # mode restored
    # And it is the eval-mode value, not one dropout sample.
    ids, mask, _ = calibration()
    model.eval()
    assert first.loss == pytest.approx(float(mean_nll(model, ids, mask)[0].detach()), rel=1e-6)


@pytest.mark.parametrize("metric", ["random", "grad_x_weight", "hutchinson_diag"])
def test_same_seed_gives_byte_identical_files(tmp_path, metric):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    probes = 2 if metric == "hutchinson_diag" else None
    paths = []
    for run, seed in enumerate((3, 3, 4)):
        path = tmp_path / f"{run}.safetensors"
        score_model(model, batches, metric, arch=arch, out_path=path, seed=seed, probes=probes)
        paths.append(path.read_bytes())
    assert paths[0] == paths[1]
    if metric != "grad_x_weight":  # seeded metrics change with the seed
        assert paths[0] != paths[2]


def test_nan_weight_raises_non_finite_loss(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss"):
        score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "s")
    assert not list(tmp_path.iterdir())  # no partial score file left behind


def test_non_finite_score_names_the_tensor(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    target = "transformer.h.1.mlp.c_fc.weight"

    def broken(ctx):
        for name in ctx.selected:
            score = ctx.parameters[name].detach().abs()
            if name == target:
                score = score.clone()
                score[0, 3] = float("inf")
            yield name, score

    spec = MetricSpec("broken", "1", "inf in one tensor", broken, needs_data=False)
    with pytest.raises(NonFiniteError, match=target.replace(".", r"\.")):
        score_model(model, None, spec, arch=arch, out_path=tmp_path / "s")
    assert not list(tmp_path.iterdir())


def test_partial_scope_stores_nan_outside_and_stats_cover_scope(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    full = score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "full")
    part = score_model(
        model,
        batches,
        "grad_x_weight",
        arch=arch,
        out_path=tmp_path / "q",
        layers=[1],
        components=["attn_q"],
    )
    assert part.parameters == [
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.bias",
    ]
    full_scores = load_scores(full.score_path)
    part_scores = load_scores(part.score_path)
    name = "transformer.h.1.attn.c_attn.weight"
    q = slice(0, 16)  # GPT-2 Conv1D [in, 3*d]: the query block is the first d output columns
    torch.testing.assert_close(part_scores[name][:, q], full_scores[name][:, q])
    assert torch.isnan(part_scores[name][:, 16:]).all()
    stats = {row["parameter"]: row for row in part.stats}
    assert stats[name]["numel"] == 16 * 16
    assert stats[name]["component"] == "attn_q"
    assert stats[name]["max"] == pytest.approx(float(full_scores[name][:, q].max()))
    assert stats[name]["nonfinite"] == 0


def test_plugin_metric_function_is_wrapped(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    with METRICS.isolated():
        METRICS.add("double_magnitude", double_magnitude)
        outcome = score_model(model, None, "double_magnitude", arch=arch, out_path=tmp_path / "s")
    scores = load_scores(outcome.score_path)
    weight = model.transformer.wpe.weight
    torch.testing.assert_close(scores["transformer.wpe.weight"], 2 * weight.detach().abs())
    assert outcome.metric_version == "7"


def double_magnitude(ctx):
    """Twice |w| (a plugin returning a dict)."""
    return {name: 2 * ctx.parameters[name].detach().abs() for name in ctx.selected}


double_magnitude.version = "7"  # type: ignore[attr-defined]
double_magnitude.needs_data = False  # type: ignore[attr-defined]


def test_bfloat16_scores_are_the_float32_scores_rounded(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    full = score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "f")
    half = score_model(
        model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "h", score_dtype="bfloat16"
    )
    ours, reference = load_scores(half.score_path), load_scores(full.score_path)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16))
    row = half.stats[0]
    assert row["max"] == float(ours[row["parameter"]].float().max())


def test_option_errors_are_clear(tmp_path):
    from cwa.errors import InvalidInput

    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    with pytest.raises(InvalidInput, match="--probes"):
        score_model(model, batches, "grad_x_weight", arch=arch, out_path=tmp_path / "a", probes=4)
    with pytest.raises(InvalidInput, match="micro_batch_size"):
        score_model(
            model, batches, "grad_squared", arch=arch, out_path=tmp_path / "b", options={"x": 1}
        )
    with pytest.raises(InvalidInput, match="calibration data"):
        score_model(model, None, "wanda", arch=arch, out_path=tmp_path / "c")
    with pytest.raises(InvalidInput, match="score dtype"):
        score_model(model, None, "magnitude", arch=arch, out_path=tmp_path / "d", score_dtype="x")
    assert not list(tmp_path.iterdir())


def test_micro_batch_examples_are_stated_and_match_a_loop(tmp_path):
    model = tiny_gpt2(seed=2)
    arch = build_architecture_map(model)
    ids, mask, batches = calibration()
    outcome = score_model(
        model, batches, "grad_squared", arch=arch, out_path=tmp_path / "s",
        options={"micro_batch_size": 2},
    )  # fmt: skip
    assert outcome.config["example"] == "micro-batch of 2 sequences"
    # Batches hold rows [0, 1] and [2, 3, 4]: examples are {0,1}, {2,3}, {4}.
    model.eval()
    params = [p for _, p in model.named_parameters()]
    name = "transformer.h.1.attn.c_proj.weight"
    index = [n for n, _ in model.named_parameters()].index(name)
    expected = torch.zeros_like(params[index])
    for rows in ([0, 1], [2, 3], [4]):
        loss, _ = mean_nll(model, ids[rows], mask[rows])
        expected += torch.autograd.grad(loss, params[index])[0] ** 2
    torch.testing.assert_close(load_scores(outcome.score_path)[name], expected / 3)
