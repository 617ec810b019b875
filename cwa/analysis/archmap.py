"""The architecture map of a run's model without reading its weights.

Analyzers need to know which layer, component and head every scored element belongs to
(fused GPT-2 ``c_attn`` split into q/k/v, GQA kv heads). The map only depends on the model's
config and module structure, so the model is instantiated from its config on the ``meta``
device: no weight is allocated or read, which takes well under a second even for large models.
"""

from __future__ import annotations

from typing import Any

from cwa.errors import CwaError, InvalidInput, ModelLoadError
from cwa.progress import NULL_REPORTER


def architecture_from_config(config: Any, *, trust_remote_code: bool = False) -> Any:
    """Build the ArchitectureMap of the model ``config`` describes (meta device, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cwa.models.architecture import build_architecture_map

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return build_architecture_map(model)


def architecture_for_run(run: Any) -> Any:
    """The ArchitectureMap of the model a (score) run used, from its config alone."""
    from cwa.models.loading import _hub_offline, _load_config, _resolve_source

    model_cfg = (run.config or {}).get("model") or {}
    ref = run.model_ref or model_cfg.get("ref")
    if not ref:
        raise InvalidInput(f"run {run.run_id} records no model; cannot map its parameters")
    trust = bool(model_cfg.get("trust_remote_code", False))
    try:
        source, folder = _resolve_source(str(ref), NULL_REPORTER)
        config = _load_config(source, str(ref), folder is not None, trust, _hub_offline())
        return architecture_from_config(config, trust_remote_code=trust)
    except CwaError as exc:
        raise ModelLoadError(
            f"cannot read the config of model {ref!r} of run {run.run_id} ({exc}); the "
            "analysis needs its architecture (the weights are not read)"
        ) from exc
