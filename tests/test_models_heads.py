"""Functional proof of the architecture map's head assignment.

For every supported family a tiny random model is built from its config. Zeroing the weights
the map assigns to a head must have exactly the effect of masking that head in the forward
pass, where masking is done independently of the map: a forward pre-hook on the attention
output projection zeroes that head's slice of its input (the concatenated head outputs).

* v elements of kv head g (weights and bias) zeroed == all query heads of group g masked
  (a zero value vector makes a head's output zero whatever its attention pattern);
* o-projection input columns of query head h zeroed == head h masked;
* all q/k/v/o elements of head h zeroed == the union of those masks;
* q elements of head h zeroed change only head h's slice of the o-projection input, and k
  elements of kv head g only the slices of the query heads in group g.

Group membership is computed here from the Hugging Face ``repeat_kv`` convention (kv head g
serves query heads g*G .. g*G+G-1), not read from the map.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from cwa.models.architecture import build_architecture_map  # noqa: E402

VOCAB = 61
SEQ = 10
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
)

# family -> (config kwargs, o-projection module path with {l} for the layer, n_heads, n_kv)
FAMILIES: dict[str, tuple[dict, str, int, int]] = {
    "gpt2": (
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
        "transformer.h.{l}.attn.c_proj",
        4,
        4,
    ),
    "gpt_neox": (
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
        ),
        "gpt_neox.layers.{l}.attention.dense",
        4,
        4,
    ),
    "opt": (
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=96,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
        "model.decoder.layers.{l}.self_attn.out_proj",
        4,
        4,
    ),
    # attention_bias/mlp_bias on: q/k/v/o biases must be assigned correctly too
    "llama": (
        dict(LLAMA_LIKE, attention_bias=True, mlp_bias=True),
        "model.layers.{l}.self_attn.o_proj",
        4,
        2,
    ),
    "mistral": (dict(LLAMA_LIKE), "model.layers.{l}.self_attn.o_proj", 4, 2),
    "qwen2": (dict(LLAMA_LIKE), "model.layers.{l}.self_attn.o_proj", 4, 2),
    # head_dim 24 != hidden/heads: heads must come from head_dim, not hidden_size
    "qwen3": (dict(LLAMA_LIKE, head_dim=24), "model.layers.{l}.self_attn.o_proj", 4, 2),
    "phi3": (dict(LLAMA_LIKE), "model.layers.{l}.self_attn.o_proj", 4, 2),
    "gemma": (dict(LLAMA_LIKE, head_dim=16), "model.layers.{l}.self_attn.o_proj", 4, 2),
    # not a supported family: exercised through the name-pattern fallback
    "gptj": (
        dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
        "transformer.h.{l}.attn.out_proj",
        4,
        4,
    ),
    "gemma2": (
        dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=6),
        "model.layers.{l}.self_attn.o_proj",
        4,
        2,
    ),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor (biases and norms included) clearly non-zero random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = "norm" in name or ".ln" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    kwargs = FAMILIES[family][0]
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **TOKENS, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    randomize_(model, seed)
    return model


def group_of_kv(kv_head: int, n_heads: int, n_kv: int) -> list[int]:
    size = n_heads // n_kv
    return list(range(kv_head * size, (kv_head + 1) * size))


def input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(3, VOCAB, (2, SEQ), generator=gen)


def o_proj(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    return model.get_submodule(FAMILIES[family][1].format(l=layer))


def logits_with_masked_heads(
    model: torch.nn.Module, family: str, layer: int, heads: list[int], head_dim: int
) -> torch.Tensor:
    """Forward pass with the given query heads' outputs zeroed before the output projection."""

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0].clone()
        for h in heads:
            hidden[..., h * head_dim : (h + 1) * head_dim] = 0.0
        return (hidden, *args[1:])

    handle = o_proj(model, family, layer).register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            return model(input_ids()).logits
    finally:
        handle.remove()


def o_proj_input(model: torch.nn.Module, family: str, layer: int) -> torch.Tensor:
    """The concatenated head outputs entering the layer's output projection."""
    captured: list[torch.Tensor] = []

    def pre_hook(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().clone())

    handle = o_proj(model, family, layer).register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            model(input_ids())
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def masked_to_zero(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """The masked elements zeroed inside the block, the weights restored afterwards."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in masks}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].masked_fill_(mask, 0.0)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def logits_with_zeroed(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward pass with the masked elements zeroed, weights restored afterwards."""
    with masked_to_zero(model, masks), torch.no_grad():
        return model(input_ids()).logits


def zeroed_o_proj_input(
    model: torch.nn.Module, family: str, layer: int, masks: dict[str, torch.Tensor]
) -> torch.Tensor:
    with masked_to_zero(model, masks):
        return o_proj_input(model, family, layer)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Tiny matmuls: thread start-up dominates and oversubscribes the shared cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    family = request.param
    model = tiny_model(family)
    return family, model, build_architecture_map(model)


def test_map_reports_family_and_geometry(family_model):
    family, model, arch = family_model
    _, _, n_heads, n_kv = FAMILIES[family]
    assert arch.family == family
    assert arch.is_fallback == (family == "gptj")
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads) == (2, n_heads, n_kv)
    expected_hd = FAMILIES[family][0].get("head_dim", 64 // n_heads)
    assert arch.head_dim == expected_hd
    assert len(arch.notes) == int(arch.is_fallback)  # only the "not a supported family" note


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroing_v_of_kv_head_equals_masking_its_query_group(family_model, layer):
    family, model, arch = family_model
    _, _, n_heads, n_kv = FAMILIES[family]
    baseline = model(input_ids()).logits.detach()
    for kv_head in range(n_kv):
        masks = arch.head_elements(layer, kv_head, components=["attn_v"])
        assert masks, "every kv head has value elements"
        zeroed = logits_with_zeroed(model, masks)
        group = group_of_kv(kv_head, n_heads, n_kv)
        masked = logits_with_masked_heads(model, family, layer, group, arch.head_dim)
        assert not torch.allclose(masked, baseline, atol=1e-4), "masking must matter"
        torch.testing.assert_close(zeroed, masked, atol=2e-5, rtol=1e-5)
        assert arch.q_heads_of_kv(kv_head) == group


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroing_o_columns_of_head_equals_masking_it(family_model, layer):
    family, model, arch = family_model
    n_heads = FAMILIES[family][2]
    for head in range(n_heads):
        masks = arch.head_elements(layer, head, components=["attn_o"])
        assert len(masks) == 1  # the o-projection weight; its bias is not in any head
        zeroed = logits_with_zeroed(model, masks)
        masked = logits_with_masked_heads(model, family, layer, [head], arch.head_dim)
        torch.testing.assert_close(zeroed, masked, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroing_all_elements_of_head_equals_masking(family_model, layer):
    family, model, arch = family_model
    _, _, n_heads, n_kv = FAMILIES[family]
    for head in range(n_heads):
        masks = arch.head_elements(layer, head)
        zeroed = logits_with_zeroed(model, masks)
        # q/o of query head `head`; k/v of kv head `head` (its whole group) when it exists
        heads = {head} | (set(group_of_kv(head, n_heads, n_kv)) if head < n_kv else set())
        masked = logits_with_masked_heads(model, family, layer, sorted(heads), arch.head_dim)
        torch.testing.assert_close(zeroed, masked, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("component", ["attn_q", "attn_k"])
def test_zeroing_q_or_k_of_head_changes_only_that_heads_output(family_model, component):
    family, model, arch = family_model
    _, _, n_heads, n_kv = FAMILIES[family]
    hd = arch.head_dim
    layer = 1
    reference = o_proj_input(model, family, layer)
    n_ids = n_heads if component == "attn_q" else n_kv
    for head in range(n_ids):
        masks = arch.head_elements(layer, head, components=[component])
        changed = zeroed_o_proj_input(model, family, layer, masks)
        affected = [head] if component == "attn_q" else group_of_kv(head, n_heads, n_kv)
        for h in range(n_heads):
            before = reference[..., h * hd : (h + 1) * hd]
            after = changed[..., h * hd : (h + 1) * hd]
            if h in affected:
                assert (after - before).abs().max() > 1e-3, (family, component, head, h)
            else:
                torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_heads_own_equal_disjoint_shares(family_model):
    """Per component, the heads' element sets are disjoint and of equal size."""
    family, model, arch = family_model
    _, _, n_heads, n_kv = FAMILIES[family]
    hd, d = arch.head_dim, 64
    for comp, n in (("attn_q", n_heads), ("attn_k", n_kv), ("attn_v", n_kv), ("attn_o", n_heads)):
        union: dict[str, torch.Tensor] = {}
        sizes = []
        for head in range(n):
            masks = arch.head_elements(0, head, components=[comp])
            sizes.append(sum(int(m.sum()) for m in masks.values()))
            for name, mask in masks.items():
                seen = union.setdefault(name, torch.zeros_like(mask))
                assert not (seen & mask).any(), f"{comp} heads overlap in {name}"
                seen |= mask
        assert len(set(sizes)) == 1, (comp, sizes)
        # one head: its weight rows/columns (hd x d), plus hd bias entries where q/k/v have bias
        assert sizes[0] in (hd * d, hd * d + hd), (comp, sizes[0])
        if comp == "attn_o":
            assert sizes[0] == hd * d  # the o bias is added after the head sum: no head
