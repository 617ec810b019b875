"""Which layer a sweep can replay from: parameters mapped to decoder layers, the stack found.

:mod:`cwa.evaluation.layer_reuse` replays the hidden states below layer L for conditions that
change only layers >= L. Here: where the decoder's ``ModuleList`` is (from the architecture
map's parameter names), which layer a parameter first changes (embeddings and tied embeddings:
before the stack, so no reuse; the final norm and an untied LM head: after the last layer),
and the sweep's L (the lowest layer of its scope).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

BEFORE_BLOCKS = -1  # a parameter the model uses before its first decoder layer
# Norms outside the layer stack that the backbone applies after the last layer.
_FINAL_NORM_NAMES = frozenset({"norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"})


def decoder_stack(model: Any, arch: Any) -> tuple[nn.Module, nn.ModuleList] | None:
    """(the module that runs the decoder layers, its ``ModuleList``), found from the
    architecture map's parameter names and layer indices; None when they do not agree on one
    ``ModuleList`` of ``arch.n_layers`` layers."""
    paths: set[str] = set()
    for name, info in arch.params.items():
        if info.layer is None:
            continue
        parts = name.split(".")
        if str(info.layer) not in parts:
            return None
        paths.add(".".join(parts[: parts.index(str(info.layer))]))
    if len(paths) != 1:
        return None
    path = paths.pop()
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(layers, nn.ModuleList) or len(layers) != arch.n_layers or not path:
        return None
    owner_path = path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    return owner, layers


def parameter_layer(name: str, arch: Any) -> int:
    """The first decoder layer whose computation ``name`` changes: its layer index;
    ``arch.n_layers`` for the final norm and an untied LM head; :data:`BEFORE_BLOCKS` for
    embeddings, tied embeddings and anything else outside the stack."""
    info = arch.params.get(name) or arch.params.get(arch.tied.get(name, ""))
    if info is None:
        return BEFORE_BLOCKS
    if info.layer is not None:
        return int(info.layer)
    components = {seg.component for seg in info.segments}
    if info.tied_to is None and components == {"lm_head"}:
        return arch.n_layers
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if components == {"norm"} and leaf in _FINAL_NORM_NAMES:
        return arch.n_layers
    return BEFORE_BLOCKS


def lowest_layer(names: Sequence[str], arch: Any) -> int:
    """The lowest layer any of ``names`` changes (see :func:`parameter_layer`)."""
    return min((parameter_layer(n, arch) for n in names), default=arch.n_layers)


@dataclass
class ReusePlan:
    """Which layer a sweep replays from (None: no reuse) and why."""

    from_layer: int | None
    reason: str


def plan_reuse(
    model: Any, arch: Any, scope_names: Sequence[str], n_conditions: int, *, enabled: bool = True
) -> ReusePlan:
    """Replay from the lowest layer of the sweep's scope (every condition's selection lies in
    it; a condition found to reach lower runs in full)."""
    if not enabled:
        return ReusePlan(None, "disabled (--no-layer-reuse)")
    if n_conditions < 2:
        return ReusePlan(None, "fewer than 2 conditions: nothing to reuse")
    if decoder_stack(model, arch) is None:
        return ReusePlan(None, "the decoder layer stack was not found in the architecture map")
    lowest = lowest_layer(scope_names, arch)
    if lowest <= 0:
        what = "layer 0" if lowest == 0 else "parameters before the first layer (embeddings)"
        return ReusePlan(None, f"the scope includes {what}: no layer below it to reuse")
    return ReusePlan(lowest, f"every condition's scope starts at layer {lowest}")
