"""What ``cwa perturb`` accepts: option checks that need neither store nor model, and the
scope the controls draw from (the ranking's scope narrowed by ``--layers/--components/--heads``,
checked against the model's architecture). Used by :mod:`cwa.stages.perturb` before it
registers a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput, UsageError
from cwa.stages.common import check_positive

if TYPE_CHECKING:
    from cwa.stages.perturb import PerturbConfig
    from cwa.store.runs import RunRecord


def parse_heads(text: str | None) -> list[tuple[int, int]] | None:
    """'3.1,5.0' -> [(3, 1), (5, 0)] (layer.head)."""
    if text is None or not text.strip():
        return None
    heads = []
    for part in text.split(","):
        layer, dot, head = part.strip().partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise InvalidInput(f"cannot read head {part.strip()!r}; write LAYER.HEAD like 3.1")
        heads.append((int(layer), int(head)))
    return heads


@dataclass
class CheckedOptions:
    method: Any  # PerturbationMethod
    treatment: Any  # ParsedSelection
    controls: list[Any]  # ParsedSelection


def validate_config(config: PerturbConfig) -> CheckedOptions:
    """Checks that need neither the store nor the model (run before anything is opened)."""
    from cwa.perturbation.apply import get_method
    from cwa.perturbation.contract import parse_selection

    method = get_method(config.method)
    config.method = method.name
    treatment = parse_selection(config.treatment)
    if treatment.spec.role != "treatment":
        raise InvalidInput(
            f"{treatment.label!r} is a control, not a treatment; put it in --controls"
        )
    controls = []
    for text in config.controls:
        parsed = parse_selection(text)
        if parsed.spec.role != "control":
            raise InvalidInput(
                f"{parsed.label!r} is a treatment and always runs as --treatment; list only "
                "controls in --controls (random_k, bottom_k, all_k or a plugin)"
            )
        if parsed.label in {c.label for c in controls}:
            raise InvalidInput(f"control {parsed.label!r} is listed twice in --controls")
        controls.append(parsed)
    if method.requires_scale and not config.scales:
        raise UsageError(f"--method {method.name} needs --scale S (or --scales 0.5,1,2)")
    if config.scales and not method.takes_scale:
        raise UsageError(f"--method {method.name} takes no --scale")
    if config.bit is not None and not method.takes_bit:
        raise UsageError(
            f"--bit applies only to methods that flip a bit (bit_flip), not {method.name}"
        )
    from cwa.ranking_prefix import check_k_text

    # Numbers or fractions ("10%"): format checked here, fractions resolved against the rank run.
    config.k_values = [check_k_text(k) for k in config.k_values] if config.k_values else None
    for scale in config.scales or []:
        if not math.isfinite(scale):
            raise InvalidInput(f"--scale {scale} is not a finite number")
        if method.nonnegative_scale and scale < 0:
            raise InvalidInput(f"--scale for {method.name} is a level and must be >= 0")
    if config.bit is not None and config.bit < 0:
        raise InvalidInput(f"--bit {config.bit} is negative; bits count from 0")
    if not config.seeds:
        raise InvalidInput("--seeds is empty; give at least one seed")
    check_positive("batch-size", config.batch_size)
    if config.limit is not None:
        check_positive("limit", config.limit)
    budget = config.layer_reuse_budget_gb
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        raise InvalidInput(f"--layer-reuse-budget must be a positive number of GiB, got {budget!r}")
    return CheckedOptions(method, treatment, controls)


def _narrowed(*lists: list | None) -> list | None:
    present = [set(x) for x in lists if x]
    if not present:
        return None
    common = set.intersection(*present)
    if not common:
        raise InvalidInput(
            "the requested layers/components do not overlap the ranking's scope; nothing "
            "would be perturbed: pick layers/components the rank run covered"
        )
    return sorted(common)


def perturb_scope(
    arch: Any, score_run: RunRecord, rank_run: RunRecord, config: PerturbConfig
) -> Any:
    """The weights the ranking covered, narrowed by the targeted options (checked on ``arch``)."""
    from cwa.models.architecture import resolve_components
    from cwa.perturbation.scope import scope_from_architecture

    def comps(x: list[str] | None) -> list[str] | None:
        return None if not x else list(resolve_components(x))

    for layer in config.layers or []:
        arch._check_layer(layer)  # a layer the model does not have: say so
    layers = _narrowed(score_run.config.get("layers"), rank_run.config.get("layers"), config.layers)
    components = _narrowed(
        comps(score_run.config.get("components")),
        comps(rank_run.config.get("components")),
        comps(config.components),
    )
    heads = config.heads
    for layer, head in heads or []:  # LAYER.J: key-value head J and the query heads reading it
        arch._check_layer(layer)
        arch._check_head(head, arch.n_kv_heads)
    if heads is None and rank_run.config.get("mode") == "head":
        # A head ranking covers only attention-head elements: so must the controls.
        layer_ids = layers if layers is not None else range(arch.n_layers)
        heads = [(layer, h) for layer in layer_ids for h in range(arch.n_kv_heads)]
        if components is None:
            components = ["attn_q", "attn_k", "attn_v", "attn_o"]
    scope = scope_from_architecture(
        arch, layers=layers, components=components, heads=heads, kv_groups=True
    )
    record = {"layers": layers, "components": components, "heads": heads}
    return scope, record
