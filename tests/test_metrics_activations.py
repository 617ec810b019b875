"""wanda and super_weight against hand computations from activations captured in the test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from cwa.errors import InvalidInput  # noqa: E402
from cwa.metrics import score_model  # noqa: E402
from cwa.models.architecture import build_architecture_map  # noqa: E402
from cwa.scorefile import load_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def calibration():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 32, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return (
        ids,
        mask,
        [
            {"input_ids": ids[:3], "attention_mask": mask[:3]},
            {"input_ids": ids[3:], "attention_mask": mask[3:]},
        ],
    )


def capture(model, ids, mask, kinds=(torch.nn.Linear, Conv1D)):
    """Full inputs and outputs of every Linear/Conv1D module (one batch, eval mode)."""
    inputs, outputs, hooks = {}, {}, []
    for module_name, module in model.named_modules():
        if isinstance(module, kinds):

            def pre(mod, args, key=module_name):
                inputs[key] = args[0].detach().clone()

            def post(mod, args, out, key=module_name):
                outputs[key] = out.detach().clone()

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return inputs, outputs


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_wanda_equals_hand_computation(tmp_path, build):
    model = build()
    arch = build_architecture_map(model)
    ids, mask, batches = calibration()
    outcome = score_model(model, batches, "wanda", arch=arch, out_path=tmp_path / "w")
    scores = load_scores(outcome.score_path)
    inputs, _ = capture(model, ids, mask)
    real = mask.bool()
    params = dict(model.named_parameters())
    expected_names = []
    for module_name, x in inputs.items():
        module = model.get_submodule(module_name)
        weight_name = next(n for n, p in params.items() if p is module.weight)
        expected_names.append(weight_name)
        norms = torch.zeros(x.shape[-1])
        for b in range(x.shape[0]):  # the definition, token by token
            for t in range(x.shape[1]):
                if real[b, t]:
                    norms += x[b, t] ** 2
        norms = norms.sqrt()
        weight = module.weight.detach().abs()
        if isinstance(module, Conv1D):  # [in, out]: input channels are rows
            expected = weight * norms[:, None]
        else:  # Linear [out, in]: input channels are columns
            expected = weight * norms[None, :]
        torch.testing.assert_close(scores[weight_name], expected, rtol=1e-5, atol=1e-8)
    assert set(scores) == set(expected_names)
    # Embeddings (unless tied to the lm_head), norms and biases are not scored.
    assert not any("norm" in n or "ln_" in n or n.endswith("bias") for n in scores)
    if build is tiny_gpt2:  # tied lm_head: the embedding is scored through its lm_head use
        assert "transformer.wte.weight" in scores and "transformer.wpe.weight" not in scores
    assert outcome.config["not_scored"]


def test_wanda_refuses_selection_without_linear_weights(tmp_path):
    model = tiny_gpt2()
    arch = build_architecture_map(model)
    _, _, batches = calibration()
    with pytest.raises(InvalidInput, match="linear"):
        score_model(
            model, batches, "wanda", arch=arch, out_path=tmp_path / "w", components=["norm"]
        )


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_super_weight_rows_and_scores(tmp_path, build):
    model = build()
    arch = build_architecture_map(model)
    ids, mask, batches = calibration()
    if build is tiny_gpt2:
        # Plant a super weight as Yu et al. describe it: a massive input activation (channel 5
        # of the MLP hidden state, via c_fc's bias) meeting a large down-projection weight.
        mlp = model.transformer.h[0].mlp
        with torch.no_grad():
            mlp.c_fc.bias[5] = 20.0
            mlp.c_proj.weight[5, 3] = 10.0  # Conv1D [in, out]: input 5 -> output 3
    # spike_threshold=0 and one round: a candidate in every down projection, so the argmax
    # bookkeeping and the scores are checked everywhere (thresholded, iterative detection is
    # tested in test_issue9_super_weights.py).
    outcome = score_model(
        model,
        batches,
        "super_weight",
        arch=arch,
        out_path=tmp_path / "s",
        options={"spike_threshold": 0.0, "rounds": 1},
    )
    scores = load_scores(outcome.score_path)
    inputs, outputs = capture(model, ids, mask)
    real = mask.bool()
    rows = outcome.extra_tables["super_weights"]
    params = dict(model.named_parameters())
    assert len(rows) == 2 and [r["layer"] for r in rows] == [0, 1]
    for row in rows:
        name = row["parameter"]
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        a = inputs[module_name][real].abs().amax(dim=0)
        b = outputs[module_name][real].abs().amax(dim=0)
        j, i = int(a.argmax()), int(b.argmax())
        assert (row["input_channel"], row["output_channel"]) == (j, i)
        assert row["input_activation"] == pytest.approx(float(a[j]))
        assert row["output_activation"] == pytest.approx(float(b[i]))
        conv = isinstance(module, Conv1D)
        assert (row["row"], row["column"]) == ((j, i) if conv else (i, j))
        assert row["weight_value"] == float(params[name].detach()[row["row"], row["column"]])
        weight = module.weight.detach().abs()
        expected = weight * (a[:, None] * b[None, :] if conv else b[:, None] * a[None, :])
        torch.testing.assert_close(scores[name], expected, rtol=1e-5, atol=1e-8)
    if build is tiny_gpt2:  # the planted weight is found and is its tensor's top score
        first = rows[0]
        assert (first["input_channel"], first["output_channel"]) == (5, 3)
        assert (first["row"], first["column"]) == (5, 3)
        assert int(scores[first["parameter"]].argmax()) == 5 * 16 + 3
