"""Models: loading causal LMs (:mod:`cwa.models.loading`) and mapping their parameters to
layers, components and attention heads (:mod:`cwa.models.architecture`).

Importing this package stays cheap (no torch/transformers); the names below are loaded on
first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "COMPONENTS": "cwa.models.architecture",
    "ArchitectureMap": "cwa.models.architecture",
    "ParamInfo": "cwa.models.architecture",
    "Segment": "cwa.models.architecture",
    "build_architecture_map": "cwa.models.architecture",
    "inspect_model": "cwa.models.inspect",
    "resolve_components": "cwa.models.architecture",
    "LoadedModel": "cwa.models.loading",
    "load_model": "cwa.models.loading",
    "model_fingerprint": "cwa.models.loading",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cwa.models' has no attribute {name!r}")
    return getattr(import_module(module), name)
