"""Issue 9, defect 6: gradient metrics accumulate in float32 on bf16/fp16 models.

``grad_x_weight`` on a bf16 model used to sum the batch gradients in ``.grad`` (bf16), rounding
every partial sum to 8 bits of mantissa. Checked here:

* exactly: the score equals |w * sum over batches of the (bf16) per-batch gradients|, summed
  in float64, to float32 precision -- for any batch split;
* against a float64 computation of the same weights: within bf16 tolerance, whatever the split.
"""

from __future__ import annotations

import pytest
import torch

from cwa.metrics import score_model
from cwa.metrics.base import count_targets, token_nll
from cwa.models.architecture import build_architecture_map
from cwa.scorefile import load_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def batches_of(ids: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(size)
    ]


def scores(model, batches, tmp_path, tag: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{tag}.safetensors"
    score_model(model, batches, "grad_x_weight", arch=build_architecture_map(model), out_path=out)
    return {k: v.double() for k, v in load_scores(out).items()}


def float64_sum_of_batch_gradients(model, batches) -> dict[str, torch.Tensor]:
    n_targets, _ = count_targets(batches)
    params = dict(model.named_parameters())
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for batch in batches:
        nll, _ = token_nll(model, batch, torch.device("cpu"))
        grads = torch.autograd.grad(nll.sum() / n_targets, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                total[name] += grad.double()
    return {n: (total[n] * params[n].detach().double()).abs() for n in params}


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))


def test_bf16_batches_are_summed_in_float32(data, tmp_path) -> None:
    model = tiny_llama(torch.bfloat16)
    for size in (1, 4):
        batches = batches_of(data, size)
        got = scores(model, batches, tmp_path, f"split{size}")
        expected = float64_sum_of_batch_gradients(model, batches)
        for name, value in got.items():
            # float32 accumulation of 32 (or 8) bf16 gradients: ~1e-7 relative; a bf16 sum
            # is off by ~1e-3..1e-2.
            torch.testing.assert_close(
                value, expected[name], rtol=2e-5, atol=1e-6 * float(expected[name].abs().max())
            )


def test_bf16_result_matches_float64_within_bf16_tolerance_for_any_split(data, tmp_path) -> None:
    model = tiny_llama(torch.bfloat16)
    reference_model = tiny_llama(torch.bfloat16).double()  # the same bf16 weights, in float64
    reference = scores(reference_model, batches_of(data, 32), tmp_path, "f64")
    results = {
        size: scores(model, batches_of(data, size), tmp_path, f"s{size}") for size in (1, 32)
    }
    for name, ref in reference.items():
        for size, got in results.items():
            assert relative_l2(got[name], ref) < 0.05, (name, size)
        assert relative_l2(results[1][name], results[32][name]) < 0.05, name
