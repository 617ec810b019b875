"""Per-family layout rules: how each parameter of a causal LM becomes :class:`Segment` blocks.

:func:`build_architecture_map` reads the model's config for its sizes (layers, heads, key-value
heads, head dim), matches every parameter name against :data:`_RULES` (first match wins) and
builds the :class:`~cwa.models.architecture.ArchitectureMap`. Fused layouts (GPT-2 ``c_attn``,
GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj`` and ``gate_up_proj``) are functions from a
parameter's shape and the model's sizes to its segments; they are applied only for the
supported families (:data:`SUPPORTED_FAMILIES`). Adding a family is one entry there and, when
its names or fused layouts are new, rules here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from cwa.errors import UnsupportedArchitecture
from cwa.models.architecture import ArchitectureMap
from cwa.models.segments import ParamInfo, Segment, _prod

# model_type -> family name used in the map (the supported, functionally tested ones).
SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "opt": "opt",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
}


_LAYER_CONTAINERS = r"(?:h|layers|layer|blocks|block|decoder_layers|transformer_blocks)"
_LAYER_RE = re.compile(rf"(?:^|\.){_LAYER_CONTAINERS}\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def parse_layer_index(name: str) -> int | None:
    """Layer index of a parameter name, e.g. ``model.layers.12.mlp...`` -> 12.

    Prefers the number after a known layer-container name (``h``, ``layers``, ``blocks``, ...);
    otherwise takes the first purely numeric name component; None outside the layer stack.
    """
    match = _LAYER_RE.search(name)
    if match is None:
        match = _ANY_INDEX_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None


def _config_dims(model: nn.Module) -> _Dims | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> Any:
        for attr in names:
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    n_layers = first("num_hidden_layers", "n_layer", "num_layers")
    n_heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    if n_layers is None or n_heads is None or hidden is None:
        return None
    n_kv = first("num_key_value_heads", "n_head_kv", "num_kv_heads")
    if n_kv is None:
        n_kv = 1 if getattr(config, "multi_query", False) else n_heads
    head_dim = first("head_dim", "head_size") or hidden // n_heads
    inter = first("intermediate_size", "ffn_dim", "n_inner")
    return _Dims(n_layers, n_heads, n_kv, head_dim, hidden, inter)


class _MapError(Exception):
    """Internal: a layout rule does not fit the tensor it matched."""


# A fused layout turns (parameter shape, dims) into the segments of one parameter.
Layout = Callable[[tuple[int, ...], _Dims], tuple[Segment, ...]]


def _gpt2_c_attn(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # Conv1D weight [in, 3*d] or bias [3*d]: [Q|K|V] along the last axis, heads inside each.
    axis = len(shape) - 1
    d = dims.n_heads * dims.head_dim
    if shape[axis] != 3 * d:
        raise _MapError(f"expected last axis 3*{d}, got shape {shape}")
    return tuple(
        Segment(comp, axis, i * d, (i + 1) * d, None, dims.n_heads, dims.head_dim, axis)
        for i, comp in enumerate(("attn_q", "attn_k", "attn_v"))
    )


@lru_cache(maxsize=64)
def _neox_index(n_heads: int, head_dim: int, part: int) -> tuple[int, ...]:
    # Rows of head h, part p (0=q, 1=k, 2=v): h*3*hd + p*hd + [0, hd). Cached so that every
    # layer's weight and bias share one tuple.
    rows = torch.arange(n_heads).unsqueeze(1) * 3 * head_dim + part * head_dim
    return tuple((rows + torch.arange(head_dim)).reshape(-1).tolist())


def _neox_qkv(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_gpt_neox: qkv.view(..., n_heads, 3*head_dim).chunk(3, dim=-1)
    d = dims.n_heads * dims.head_dim
    if shape[0] != 3 * d:
        raise _MapError(f"expected first axis 3*{d}, got shape {shape}")
    segments = []
    for part, comp in enumerate(("attn_q", "attn_k", "attn_v")):
        rows = _neox_index(dims.n_heads, dims.head_dim, part)
        # start/stop give the bounding range; the rows themselves are `index`
        segments.append(
            Segment(
                comp,
                dim=0,
                start=rows[0],
                stop=rows[-1] + 1,
                index=rows,
                n_heads=dims.n_heads,
                head_dim=dims.head_dim,
                head_axis=0,
            )
        )
    return tuple(segments)


def _phi3_qkv(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_phi3: q = qkv[..., :nq*hd], k = next nkv*hd, v = the rest.
    q = dims.n_heads * dims.head_dim
    kv = dims.n_kv_heads * dims.head_dim
    if shape[0] != q + 2 * kv:
        raise _MapError(f"expected first axis {q}+2*{kv}, got shape {shape}")
    return (
        Segment("attn_q", 0, 0, q, None, dims.n_heads, dims.head_dim, 0),
        Segment("attn_k", 0, q, q + kv, None, dims.n_kv_heads, dims.head_dim, 0),
        Segment("attn_v", 0, q + kv, q + 2 * kv, None, dims.n_kv_heads, dims.head_dim, 0),
    )


def _phi3_gate_up(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_phi3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    if shape[0] % 2:
        raise _MapError(f"expected an even first axis, got shape {shape}")
    half = shape[0] // 2
    return (Segment("mlp_gate", 0, 0, half), Segment("mlp_up", 0, half, shape[0]))


@dataclass(frozen=True)
class _Rule:
    """How parameters whose name matches ``pattern`` are mapped (first matching rule wins).

    Either ``fused`` (a layout of several components, applied only for supported families)
    or one ``component`` for the whole tensor, with heads along its input features
    (``heads="in"``), its output features (``heads="out"``) or none.
    """

    pattern: re.Pattern[str]
    component: str = "other"
    heads: str | None = None  # "in" | "out" | None
    kv: bool = False  # heads are key/value heads
    fused: Layout | None = None


def _rule(
    pattern: str,
    component: str = "other",
    heads: str | None = None,
    kv: bool = False,
    fused: Layout | None = None,
) -> _Rule:
    return _Rule(re.compile(pattern), component, heads, kv, fused)


_W = r"\.(weight|bias)$"
_RULES: tuple[_Rule, ...] = (
    # fused attention / MLP layouts of the supported families
    _rule(r"\.attn\.c_attn" + _W, fused=_gpt2_c_attn),
    _rule(r"\.(self_)?attention\.query_key_value" + _W, fused=_neox_qkv),
    _rule(r"\.self_attn\.qkv_proj" + _W, fused=_phi3_qkv),
    _rule(r"\.mlp\.gate_up_proj" + _W, fused=_phi3_gate_up),
    # attention output projections: heads along the input features; bias after the head sum
    _rule(r"\.(o_proj|out_proj|attn\.c_proj|(self_)?attention\.dense)\.weight$", "attn_o", "in"),
    _rule(r"\.(o_proj|out_proj|attn\.c_proj|(self_)?attention\.dense)\.bias$", "attn_o"),
    # separate q/k/v projections: heads along the output features (bias included)
    _rule(r"\.(q_proj|query|q_lin|wq)" + _W, "attn_q", "out"),
    _rule(r"\.(k_proj|key|k_lin|wk)" + _W, "attn_k", "out", kv=True),
    _rule(r"\.(v_proj|value|v_lin|wv)" + _W, "attn_v", "out", kv=True),
    # MLPs
    _rule(r"\.(gate_proj|w1)" + _W, "mlp_gate"),
    _rule(r"\.(up_proj|fc1|c_fc|dense_h_to_4h|w3|fc_in)" + _W, "mlp_up"),
    _rule(r"\.(down_proj|fc2|mlp\.c_proj|dense_4h_to_h|w2|fc_out)" + _W, "mlp_down"),
    # embeddings and output head
    _rule(r"(^|\.)(wpe|embed_positions|position_embeddings)\.weight$", "pos_embed"),
    _rule(r"(^|\.)(wte|embed_tokens|embed_in|word_embeddings|tok_embeddings)\.weight$", "embed"),
    _rule(r"(^|\.)(lm_head|embed_out)" + _W, "lm_head"),
    # norms (Qwen3's q_norm/k_norm included: one vector shared by all heads)
    _rule(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*)" + _W, "norm"),
)


def _module_kind(model: nn.Module, name: str) -> str:
    """'linear' ([out, in]), 'conv1d' ([in, out]) or 'other' for the module owning ``name``."""
    module_name = name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "other"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D (GPT-2 family)
        return "conv1d"
    return "other"


def _head_axis(heads: str, shape: tuple[int, ...], kind: str) -> int | None:
    """Axis holding the heads, or None when the module's orientation is unknown."""
    if len(shape) == 1:
        return 0 if heads == "out" else None  # a bias lives on the output features
    if len(shape) != 2:
        return None
    out_axis = {"linear": 0, "conv1d": 1}.get(kind)
    if out_axis is None:
        return None
    return out_axis if heads == "out" else 1 - out_axis


def _segments_for(
    model: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dims: _Dims | None,
    strict: bool,
    notes: list[str],
) -> tuple[Segment, ...]:
    """Segments of one parameter. ``strict`` (supported family): a misfit is an error.

    Not strict (fallback): fused tensors are never guessed (mapped to ``other``) and a tensor
    whose shape does not show the expected heads keeps its component without heads.
    """
    numel = _prod(shape)
    for rule in _RULES:
        if not rule.pattern.search(name):
            continue
        if rule.fused is not None:
            if not strict:
                notes.append(f"{name}: fused tensor of unknown layout mapped to 'other'")
                return (Segment("other", None, 0, numel),)
            assert dims is not None
            try:
                return rule.fused(shape, dims)
            except _MapError as exc:
                raise UnsupportedArchitecture(
                    f"parameter {name} does not fit its family's fused layout ({exc}); "
                    "this model variant is not supported"
                ) from None
        if rule.heads is None:
            return (Segment(rule.component, None, 0, numel),)
        axis = _head_axis(rule.heads, shape, _module_kind(model, name))
        n_heads = None if dims is None else (dims.n_kv_heads if rule.kv else dims.n_heads)
        if (
            axis is not None
            and dims is not None
            and n_heads is not None
            and shape[axis] == n_heads * dims.head_dim
        ):
            return (Segment(rule.component, None, 0, numel, None, n_heads, dims.head_dim, axis),)
        if strict:
            raise UnsupportedArchitecture(
                f"parameter {name} of shape {shape} does not show {n_heads} heads of "
                f"{None if dims is None else dims.head_dim} along its "
                f"{rule.heads}put features; this model variant is not supported"
            )
        notes.append(f"{name}: mapped to {rule.component!r} without head structure")
        return (Segment(rule.component, None, 0, numel),)
    notes.append(f"{name}: no rule matches this name; mapped to 'other'")
    return (Segment("other", None, 0, numel),)


def build_architecture_map(model: nn.Module) -> ArchitectureMap:
    """Map every parameter of ``model`` to (layer, component, heads).

    Supported families (``config.model_type``): gpt2, gpt_neox, opt, llama, mistral, qwen2,
    qwen3, phi3, gemma, gemma2. Others get the name-pattern fallback (``is_fallback=True``).
    Raises :class:`~cwa.errors.UnsupportedArchitecture` when the model has no parameters, or
    when a supported family's tensor does not have the shape its layout requires.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedArchitecture(
            f"expected a torch.nn.Module, got {type(model).__name__}; load the model first"
        )
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    family = SUPPORTED_FAMILIES.get(model_type)
    is_fallback = family is None
    dims = _config_dims(model)
    if family is not None and dims is None:
        raise UnsupportedArchitecture(
            f"{model_type} config lacks layer/head sizes; cannot map its heads; "
            "check that config.json is complete"
        )

    # Tied tensors: named_parameters() keeps the first name; the others are aliases.
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first_name:
            tied[name] = first_name[key]
        else:
            first_name[key] = name
    tied_to: dict[str, str] = {}
    for alias, stored in tied.items():
        tied_to.setdefault(stored, alias)

    notes: list[str] = []
    if is_fallback:
        notes.append(
            f"model_type {model_type or type(model).__name__!r} is not a supported family; "
            "components come from parameter-name patterns"
        )
    params: dict[str, ParamInfo] = {}
    layers_seen: set[int] = set()
    for name, param in model.named_parameters():
        shape = tuple(int(s) for s in param.shape)
        numel = _prod(shape)
        layer = parse_layer_index(name)
        if layer is not None:
            layers_seen.add(layer)
        segments = _segments_for(model, name, shape, dims, not is_fallback, notes)
        if sum(seg.numel(shape) for seg in segments) != numel:
            raise UnsupportedArchitecture(
                f"internal map error: segments of {name} do not cover its {numel} elements; "
                "please report this model"
            )
        params[name] = ParamInfo(name, shape, numel, layer, segments, tied_to.get(name))
    if not params:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no parameters; nothing to analyse"
        )
    if dims is not None:
        n_layers = dims.n_layers
        if layers_seen and max(layers_seen) >= n_layers:
            notes.append(
                f"parameter names reach layer {max(layers_seen)} but config says {n_layers} "
                "layers; using the names"
            )
            n_layers = max(layers_seen) + 1
        n_heads, n_kv, head_dim, hidden = (
            dims.n_heads,
            dims.n_kv_heads,
            dims.head_dim,
            dims.hidden_size,
        )
    else:
        n_layers = max(layers_seen) + 1 if layers_seen else 0
        n_heads = n_kv = head_dim = hidden = 0
        notes.append("config has no head sizes; no head structure mapped")
    # One note per kind of tensor, not per layer: "h.0.x" and "h.1.x" read as "h.*.x".
    notes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", note) for note in notes))
    return ArchitectureMap(
        family=family or (model_type or type(model).__name__),
        is_fallback=is_fallback,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        params=params,
        tied=tied,
        notes=notes,
    )
