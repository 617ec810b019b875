"""Architecture map bookkeeping: counts, tensor shapes, fused layouts, scoping, fallback.

Expected per-component counts are computed here by hand from each config (formulas written
out per family), never read back from the map.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from cwa.errors import InvalidInput, UnknownComponent, UnsupportedArchitecture  # noqa: E402
from cwa.models.architecture import (  # noqa: E402
    COMPONENTS,
    ArchitectureMap,
    build_architecture_map,
    inspect_model,
    parse_layer_index,
    resolve_components,
)

V, D, L, H, KV, FF, P = 61, 64, 2, 4, 2, 96, 64  # vocab, hidden, layers, heads, kv, mlp, pos
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(
    hidden_size=D,
    num_hidden_layers=L,
    num_attention_heads=H,
    num_key_value_heads=KV,
    intermediate_size=FF,
    max_position_embeddings=P,
)
CONFIGS = {
    "gpt2": dict(n_embd=D, n_layer=L, n_head=H, n_positions=P),
    "gpt_neox": dict(
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=FF,
        max_position_embeddings=P,
    ),
    "opt": dict(
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        ffn_dim=FF,
        max_position_embeddings=P,
        word_embed_proj_dim=D,
    ),
    "llama": dict(LLAMA_LIKE, attention_bias=True, mlp_bias=True),
    "mistral": dict(LLAMA_LIKE),
    "qwen2": dict(LLAMA_LIKE),
    "qwen3": dict(LLAMA_LIKE, head_dim=24),
    "phi3": dict(LLAMA_LIKE),
    "gemma": dict(LLAMA_LIKE, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16),
}


def build(model_type: str, **overrides) -> torch.nn.Module:
    kwargs = dict(CONFIGS.get(model_type, {}), **overrides)
    config = AutoConfig.for_model(model_type, vocab_size=V, **TOKENS, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def expected_counts(family: str) -> dict[str, int]:
    """Per-component parameter counts written out by hand for each family's layout."""
    hd = CONFIGS[family].get("head_dim", D // H)
    q, kv = H * hd, KV * hd
    e = dict.fromkeys(COMPONENTS, 0)
    if family == "gpt2":  # Conv1D with biases, MLP 4*d, tied lm_head
        e.update(embed=V * D, pos_embed=P * D, attn_o=L * (D * D + D))
        for c in ("attn_q", "attn_k", "attn_v"):
            e[c] = L * (D * D + D)
        e.update(mlp_up=L * (D * 4 * D + 4 * D), mlp_down=L * (4 * D * D + D))
        e["norm"] = (2 * L + 1) * 2 * D
    elif family == "gpt_neox":  # fused qkv with biases, untied embed_out
        for c in ("attn_q", "attn_k", "attn_v", "attn_o"):
            e[c] = L * (D * D + D)
        e.update(embed=V * D, lm_head=V * D, mlp_up=L * (D * FF + FF), mlp_down=L * (FF * D + D))
        e["norm"] = (2 * L + 1) * 2 * D
    elif family == "opt":  # learned positions with offset 2, tied lm_head
        for c in ("attn_q", "attn_k", "attn_v", "attn_o"):
            e[c] = L * (D * D + D)
        e.update(embed=V * D, pos_embed=(P + 2) * D, mlp_up=L * (D * FF + FF))
        e.update(mlp_down=L * (FF * D + D), norm=(2 * L + 1) * 2 * D)
    else:
        bias = family in ("llama", "qwen2")  # q/k/v biases (llama: attention_bias=True)
        e["attn_q"] = L * (q * D + (q if bias else 0))
        e["attn_k"] = e["attn_v"] = L * (kv * D + (kv if bias else 0))
        e["attn_o"] = L * (D * q + (D if family == "llama" else 0))
        mlp_bias = family == "llama"
        e["mlp_up"] = e["mlp_gate"] = L * (D * FF + (FF if mlp_bias else 0))
        e["mlp_down"] = L * (FF * D + (D if mlp_bias else 0))
        e["embed"] = V * D
        e["lm_head"] = 0 if family in ("gemma", "gemma2") else V * D
        norms_per_layer = 4 if family == "gemma2" else 2
        e["norm"] = (norms_per_layer * L + 1) * D + (2 * L * hd if family == "qwen3" else 0)
    return e


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_component_counts_match_hand_formulas_and_total(family):
    model = build(family)
    arch = build_architecture_map(model)
    counts = arch.component_counts()
    assert counts == expected_counts(family)
    unique_total = sum(p.numel() for p in model.parameters())  # tied tensors once
    assert sum(counts.values()) == arch.total_params == unique_total
    rows = arch.summary_rows()
    assert sum(r["n_params"] for r in rows) == unique_total


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma", "gemma2"])
def test_tied_lm_head_counted_once_and_marked(family):
    model = build(family)
    arch = build_architecture_map(model)
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in all_names and "lm_head.weight" not in arch.params
    embed_name = next(n for n, i in arch.params.items() if i.components == ("embed",))
    assert arch.params[embed_name].tied_to == "lm_head.weight"
    assert arch.tied == {"lm_head.weight": embed_name}
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_duplicates - arch.total_params == V * D
    # the alias resolves to the stored tensor
    assert arch.component_ids("lm_head.weight").shape == (V, D)


def test_untied_lm_head_is_its_own_component():
    arch = build_architecture_map(build("llama"))
    assert arch.params["lm_head.weight"].components == ("lm_head",)
    assert arch.params["model.embed_tokens.weight"].tied_to is None and arch.tied == {}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_id_tensors_have_param_shape_and_dtype(family):
    model = build(family)
    arch = build_architecture_map(model)
    for name, param in model.named_parameters():
        comp = arch.component_ids(name)
        heads = arch.head_ids(name)
        assert comp.shape == param.shape and comp.dtype == torch.int8
        assert heads.shape == param.shape and heads.dtype == torch.int32
        assert int(comp.min()) >= 0 and int(comp.max()) < len(COMPONENTS)
        info = arch.params[name]
        assert info.shape == tuple(param.shape) and info.numel == param.numel()
        # elements outside attention q/k/v/o never carry a head
        attn = torch.tensor([COMPONENTS.index(c) for c in ("attn_q", "attn_k", "attn_v", "attn_o")])
        assert bool((heads[~torch.isin(comp, attn.to(torch.int8))] == -1).all())


def test_neox_interleaved_rows_by_hand():
    arch = build_architecture_map(build("gpt_neox"))
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    comp, heads = arch.component_ids(name)[:, 0], arch.head_ids(name)[:, 0]
    hd = D // H
    for row in (0, hd - 1, hd, 2 * hd, 3 * hd, 3 * hd + hd + 5, 3 * D - 1):
        head, within = divmod(row, 3 * hd)  # view(..., n_heads, 3*hd).chunk(3, -1)
        part = ("attn_q", "attn_k", "attn_v")[within // hd]
        assert COMPONENTS[int(comp[row])] == part and int(heads[row]) == head, row
    bias = arch.component_ids(name.replace("weight", "bias"))
    assert torch.equal(bias, comp)
    assert arch.params[name].layer == 1


def test_gpt2_c_attn_columns_by_hand():
    arch = build_architecture_map(build("gpt2"))
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D [in, 3*d]
    comp, heads = arch.component_ids(name), arch.head_ids(name)
    hd = D // H
    assert COMPONENTS[int(comp[5, 0])] == "attn_q" and int(heads[5, hd]) == 1
    assert COMPONENTS[int(comp[7, D])] == "attn_k" and int(heads[7, D + 3 * hd]) == 3
    assert COMPONENTS[int(comp[0, 2 * D + hd])] == "attn_v" and int(heads[0, 2 * D + hd]) == 1
    assert bool((comp[:, :D] == comp[0, 0]).all())  # columns, not rows, carry the split
    o = arch.head_ids("transformer.h.0.attn.c_proj.weight")  # Conv1D [d_in, d_out]
    assert int(o[hd, 0]) == 1 and int(o[0, 3 * hd]) == 0
    assert bool((arch.head_ids("transformer.h.0.attn.c_proj.bias") == -1).all())


def test_phi3_contiguous_blocks_by_hand():
    arch = build_architecture_map(build("phi3"))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    comp, heads = arch.component_ids(qkv)[:, 0], arch.head_ids(qkv)[:, 0]
    hd = D // H
    q, kv = H * hd, KV * hd
    assert [COMPONENTS[int(c)] for c in comp[[0, q - 1, q, q + kv - 1, q + kv, -1]]] == [
        "attn_q", "attn_q", "attn_k", "attn_k", "attn_v", "attn_v"
    ]  # fmt: skip
    assert int(heads[q + hd]) == 1 and int(heads[q + kv + hd - 1]) == 0
    gate_up = arch.component_ids("model.layers.0.mlp.gate_up_proj.weight")[:, 0]
    assert COMPONENTS[int(gate_up[0])] == "mlp_gate" and COMPONENTS[int(gate_up[FF])] == "mlp_up"


def test_select_and_scope_mask():
    arch = build_architecture_map(build("phi3"))
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    assert arch.select(layers=[1], components=["attn_v"]) == [qkv]
    mask = arch.scope_mask(qkv, layers=[1], components=["attn_v"])
    assert mask is not None and mask.dtype == torch.bool
    hd = D // H
    assert int(mask.sum()) == KV * hd * D and bool(mask[-1].all()) and not bool(mask[0].any())
    # whole tensor in scope -> None; out of layer scope -> all False
    assert arch.scope_mask(qkv, components=["qkv"]) is None
    assert arch.scope_mask(qkv) is None
    assert not bool(arch.scope_mask(qkv, layers=[0]).any())
    # layer filter excludes tensors outside the stack; no filter includes them
    assert "model.embed_tokens.weight" not in arch.select(layers=[0, 1])
    assert arch.select(components=["embed"]) == ["model.embed_tokens.weight"]
    # negative layer counts from the end; groups expand
    assert arch.select(layers=[-1], components=["mlp"]) == arch.select(
        layers=[1], components=["mlp_gate", "mlp_up", "mlp_down"]
    )
    llama = build_architecture_map(build("llama"))
    selected = llama.select(layers=[0], components=["attn_k", "norm"])
    assert selected == [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ]
    order = list(llama.params)
    assert selected == sorted(selected, key=order.index)  # named_parameters order


def test_unknown_component_and_bad_ranges():
    arch = build_architecture_map(build("llama"))
    with pytest.raises(UnknownComponent, match="did you mean attn_q"):
        arch.select(components=["attn_qq"])
    with pytest.raises(UnknownComponent, match="valid components"):
        arch.scope_mask("model.norm.weight", components=["bogus"])
    with pytest.raises(InvalidInput, match="layers 0..1"):
        arch.select(layers=[2])
    with pytest.raises(InvalidInput, match="heads 0..3"):
        arch.head_elements(0, 4)
    with pytest.raises(InvalidInput, match="no parameter named"):
        arch.head_ids("model.layers.0.nope")
    assert resolve_components(["attn", "attn_q"]) == ("attn_q", "attn_k", "attn_v", "attn_o")
    assert resolve_components(None) is None


def test_gqa_head_elements_use_kv_numbering():
    arch = build_architecture_map(build("llama"))
    # query head 3 exists for q/o; kv heads are 0..1 so k/v contribute nothing
    names = set(arch.head_elements(1, 3))
    assert names == {"model.layers.1.self_attn.q_proj.weight",
                     "model.layers.1.self_attn.q_proj.bias",
                     "model.layers.1.self_attn.o_proj.weight"}  # fmt: skip
    assert arch.kv_head_of(3) == 1 and arch.q_heads_of_kv(0) == [0, 1]
    k = arch.head_elements(1, 1, components=["attn_k"])["model.layers.1.self_attn.k_proj.weight"]
    hd = D // H
    assert bool(k[hd:].all()) and not bool(k[:hd].any())


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("transformer.h.11.attn.c_attn.weight", 11),
        ("model.layers.0.mlp.down_proj.weight", 0),
        ("model.decoder.layers.7.fc1.bias", 7),
        ("gpt_neox.layers.23.attention.dense.weight", 23),
        ("blocks.3.attn.W_Q", 3),
        ("encoder.stack.5.w", 5),
        ("model.norm.weight", None),
        ("transformer.wte.weight", None),
        ("lm_head.weight", None),
        ("model.layers.2.experts.7.w1.weight", 2),  # the layer, not the expert index
    ],
)
def test_parse_layer_index(name, layer):
    assert parse_layer_index(name) == layer


def test_fallback_maps_by_name_and_says_so():
    gptj = build_architecture_map(build("gptj", n_embd=D, n_layer=L, n_head=H, rotary_dim=8))
    assert gptj.is_fallback and gptj.family == "gptj"
    assert gptj.params["transformer.h.0.attn.q_proj.weight"].components == ("attn_q",)
    assert gptj.params["lm_head.bias"].components == ("lm_head",)
    assert gptj.component_counts()["other"] == 0
    # fused qkv of unknown layout is never guessed
    bigcode = build_architecture_map(build("gpt_bigcode", n_embd=D, n_layer=L, n_head=H))
    assert bigcode.is_fallback
    assert bigcode.params["transformer.h.0.attn.c_attn.weight"].components == ("other",)
    assert any("c_attn.weight: fused" in note for note in bigcode.notes)
    o_heads = bigcode.head_ids("transformer.h.0.attn.c_proj.weight")  # nn.Linear here
    assert int(o_heads[0, D - 1]) == H - 1
    # mlp.c_proj of an unknown family is still the down projection
    assert bigcode.params["transformer.h.1.mlp.c_proj.weight"].components == ("mlp_down",)


def test_fallback_for_plain_module_without_config():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)
            self.mystery = torch.nn.Parameter(torch.zeros(3))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(10, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])

    net = Net()
    arch = build_architecture_map(net)
    assert arch.is_fallback and arch.n_layers == 2 and arch.n_heads == 0
    assert arch.params["layers.1.q_proj.weight"].components == ("attn_q",)
    assert bool((arch.head_ids("layers.1.q_proj.weight") == -1).all())
    assert arch.params["layers.0.mystery"].components == ("other",)
    assert arch.total_params == sum(p.numel() for p in net.parameters())


def test_hopeless_models_raise():
    with pytest.raises(UnsupportedArchitecture, match="no parameters"):
        build_architecture_map(torch.nn.Sequential())
    with pytest.raises(UnsupportedArchitecture, match="torch.nn.Module"):
        build_architecture_map("gpt2")  # type: ignore[arg-type]
    # a supported family whose tensors do not fit the family layout
    model = build("llama")
    model.model.layers[0].self_attn.k_proj = torch.nn.Linear(D, 3 * D // H * 2)
    with pytest.raises(UnsupportedArchitecture, match="k_proj"):
        build_architecture_map(model)


def test_inspect_model_summary():
    model = build("qwen3")
    report = inspect_model(model)
    json.dumps(report)  # JSON-ready
    assert report["family"] == "qwen3" and report["is_fallback"] is False
    assert (report["n_layers"], report["n_heads"], report["n_kv_heads"]) == (L, H, KV)
    assert report["head_dim"] == 24 and report["hidden_size"] == D
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    rows = {(r["layer"], r["component"]): r for r in report["rows"]}
    assert rows[(0, "attn_k")]["n_heads"] == KV and rows[(0, "attn_q")]["n_heads"] == H
    assert rows[(1, "attn_q")]["n_params"] == H * 24 * D
    assert rows[(1, "norm")]["n_tensors"] == 4  # 2 layer norms + q_norm + k_norm
    assert report["tied_embeddings"] is False
    from cwa.models.inspect import inspect_model as cli_path

    assert cli_path is inspect_model
    assert rows[(None, "embed")]["n_params"] == V * D
    assert report["rows"][0]["component"] == "embed"  # embeddings first
    assert report["rows"][-1]["component"] == "lm_head"  # head last
    assert inspect_model(build_architecture_map(model))["rows"] == report["rows"]
    assert isinstance(build_architecture_map(model), ArchitectureMap)
    with pytest.raises(InvalidInput):
        inspect_model(42)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "qwen2"])
def test_fast_per_axis_path_equals_generic_block_path(family, monkeypatch):
    from cwa.models import architecture

    arch = build_architecture_map(build(family))
    fast = {n: (arch.component_ids(n), arch.head_ids(n)) for n in arch.params}
    fast_heads = {h: arch.head_elements(1, h) for h in range(H)}
    monkeypatch.setattr(architecture, "_axis_profile", lambda info: None)
    for name, (comp, heads) in fast.items():
        assert torch.equal(arch.component_ids(name), comp), name
        assert torch.equal(arch.head_ids(name), heads), name
    # head masks agree with the element-wise definition: component in set and head id match
    wanted = torch.tensor([COMPONENTS.index(c) for c in ("attn_q", "attn_k", "attn_v", "attn_o")])
    for head, masks in fast_heads.items():
        for name in arch.select(layers=[1]):
            expected = torch.isin(arch.component_ids(name), wanted.to(torch.int8)) & (
                arch.head_ids(name) == head
            )
            got = masks.get(name, torch.zeros_like(expected))
            assert torch.equal(got, expected), (name, head)


def test_block_cut_along_one_axis_with_heads_along_another():
    from cwa.models.architecture import ParamInfo, Segment

    # rows 0-1: attn_q with 2 heads of 3 along the columns; rows 2-3: other
    info = ParamInfo(
        "layers.0.mix.weight",
        (4, 6),
        24,
        0,
        (
            Segment("attn_q", 0, 0, 2, None, 2, 3, 1),
            Segment("other", 0, 2, 4),
        ),
    )
    arch = ArchitectureMap("hand", True, 1, 2, 2, 3, 6, {info.name: info})
    q, other = COMPONENTS.index("attn_q"), COMPONENTS.index("other")
    assert arch.component_ids(info.name).tolist() == [[q] * 6] * 2 + [[other] * 6] * 2
    assert arch.head_ids(info.name).tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[-1] * 6] * 2
    mask = arch.head_elements(0, 1)[info.name]
    assert mask.tolist() == [[False] * 3 + [True] * 3] * 2 + [[False] * 6] * 2
    scope = arch.scope_mask(info.name, components=["other"])
    assert scope.tolist() == [[False] * 6] * 2 + [[True] * 6] * 2
