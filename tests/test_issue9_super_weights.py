"""Issue 9, defect 5: super weights per Yu et al. 2024 -- thresholded, iterative, with the
activation profile.

A tiny GPT-2 gets a planted super weight: hidden unit 5 of layer 0's MLP is a constant 100 on
every token (input spike) and the down-projection weight W[5, 3] = 10 turns it into a
massive output at channel 3. The metric must find exactly that weight and nothing else; with a
second planted weight W[5, 8] = 4 (hidden by the first in round 1), iterative detection finds it
in round 2. The profile rows are checked against activations captured by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from cwa.metrics import score_model
from cwa.models.architecture import build_architecture_map

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2(second: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, 5] = 0.0
        mlp.c_fc.bias[5] = 100.0
        mlp.c_proj.weight[5, :] = 0.0
        mlp.c_proj.weight[5, 3] = 10.0  # Conv1D [in, out]: input 5 -> output 3
        if second:
            mlp.c_proj.weight[5, 8] = 4.0
    return model


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 40, (6, 12), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(3)]


def run(model, tmp_path, **options):
    arch = build_architecture_map(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outcome = score_model(
        model, batches(), "super_weight", arch=arch, out_path=tmp_path / "s", options=options
    )
    for name, param in model.named_parameters():  # zeroed candidates restored bit-exactly
        assert torch.equal(param.detach(), before[name]), name
    return outcome.extra_tables["super_weights"], outcome.extra_tables["activation_profile"]


def captured_maxima(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """max |input| and |output| per channel of every c_proj in the MLPs, by plain hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for index, block in enumerate(model.transformer.h):

        def hook(module, args, output, index=index):
            seen.setdefault(f"in{index}", []).append(args[0].detach().abs().flatten(0, 1))
            seen.setdefault(f"out{index}", []).append(output.detach().abs().flatten(0, 1))

        hooks.append(block.mlp.c_proj.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches():
            model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    return {
        f"transformer.h.{i}.mlp.c_proj.weight": (
            torch.cat(seen[f"in{i}"]).amax(dim=0),
            torch.cat(seen[f"out{i}"]).amax(dim=0),
        )
        for i in range(len(model.transformer.h))
    }


def test_planted_super_weight_is_found_and_nothing_else(tmp_path) -> None:
    model = tiny_gpt2()
    candidates, profile = run(model, tmp_path)
    assert [(c["parameter"], c["row"], c["column"], c["round"]) for c in candidates] == [
        ("transformer.h.0.mlp.c_proj.weight", 5, 3, 1)
    ]
    assert candidates[0]["weight_value"] == 10.0
    assert (candidates[0]["input_channel"], candidates[0]["output_channel"]) == (5, 3)
    # Round 1 found it; round 2 (with it zeroed) found nothing more, so detection stopped.
    assert sorted({r["round"] for r in profile}) == [1, 2]
    maxima = captured_maxima(model)
    for row in (r for r in profile if r["round"] == 1):
        a, b = maxima[row["parameter"]]
        assert row["max_input_abs"] == pytest.approx(float(a.max()), rel=1e-6)
        assert row["input_channel"] == int(a.argmax())
        assert row["input_spike_ratio"] == pytest.approx(float(a.max() / a.median()), rel=1e-6)
        assert row["max_output_abs"] == pytest.approx(float(b.max()), rel=1e-6)
        assert row["output_channel"] == int(b.argmax())
        assert row["output_spike_ratio"] == pytest.approx(float(b.max() / b.median()), rel=1e-6)
    layer0_round2 = next(r for r in profile if r["round"] == 2 and r["layer"] == 0)
    assert layer0_round2["max_output_abs"] < 0.1 * candidates[0]["output_activation"]


def test_iterative_detection_finds_the_masked_second_weight(tmp_path) -> None:
    found, _ = run(tiny_gpt2(second=True), tmp_path)
    assert [(c["row"], c["column"], c["round"]) for c in found] == [(5, 3, 1), (5, 8, 2)]
    once, profile = run(tiny_gpt2(second=True), tmp_path, rounds=1)
    assert [(c["row"], c["column"]) for c in once] == [(5, 3)]
    assert {r["round"] for r in profile} == {1}
    # A threshold above the planted spikes finds nothing.
    none, _ = run(tiny_gpt2(second=True), tmp_path, spike_threshold=1e9)
    assert none == []


def test_a_random_model_has_no_super_weight(tmp_path) -> None:
    candidates, profile = run(tiny_llama(), tmp_path)
    assert candidates == []
    assert [r["layer"] for r in profile] == [0, 1, 2] and {r["round"] for r in profile} == {1}
    assert all(r["input_spike_ratio"] < 50 and r["output_spike_ratio"] < 50 for r in profile)


def test_score_stage_stores_the_profile_and_candidates(cli, tmp_path, store_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cwa.store import Store

    folder = tmp_path / "planted"
    tiny_gpt2().save_pretrained(folder)
    words = [f"w{i}" for i in range(38)]
    core = Tokenizer(
        models.WordLevel(
            {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<unk>"
        )
    )
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(
        "\n".join(
            " ".join(words[int(i)] for i in torch.randint(0, 38, (20,), generator=g))
            for _ in range(30)
        )
    )
    result = cli(
        "--json", "score", "--model", str(folder), "--metric", "super_weight", "--data", str(text),
        "--n-samples", "4", "--seq-len", "16", "--metric-option", "rounds=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_id = json.loads(result.stdout)["runs"][0]["run_id"]
    with Store(store_path).read() as con:
        supers = con.execute(
            "SELECT layer, row_index, column_index, round, input_spike_ratio > 50, "
            "output_spike_ratio > 50 FROM super_weights WHERE run_id = ?",
            [run_id],
        ).fetchall()
        profile = con.execute(
            "SELECT layer, round FROM activation_profile WHERE run_id = ? ORDER BY round, layer",
            [run_id],
        ).fetchall()
    assert supers == [(0, 5, 3, 1, True, True)]
    assert profile == [(0, 1), (1, 1), (0, 2), (1, 2)]
    bad = cli("score", "--model", str(folder), "--metric", "super_weight", "--data", str(text),
              "--metric-option", "round=2")  # fmt: skip
    assert bad.exit_code == 1 and "no option 'round'" in bad.stderr
