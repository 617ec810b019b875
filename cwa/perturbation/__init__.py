"""Perturbing selected weights in place against matched controls, and restoring them exactly.

* :mod:`cwa.perturbation.methods` — what a selected weight becomes (zero, sign_flip, scale,
  gaussian_noise, bit_flip).
* :mod:`cwa.perturbation.scope` — which weights a selection may draw from (tensors, and masks
  of the in-scope elements of fused or partly selected tensors).
* :mod:`cwa.perturbation.selection` — which weights are perturbed: ``top_k`` (a ranking),
  ``random_k``, ``bottom_k`` and ``all_k`` controls with exact counts.
* :mod:`cwa.perturbation.contract` — the selection contract (:class:`SelectionSpec`): what a
  registered selection (built-in, plugin, or the analyze stage's ``cluster:ID``) provides;
  :mod:`cwa.perturbation.builtin_selections` holds the built-in specs and
  :mod:`cwa.perturbation.groups` the groups of every rank mode that controls are matched in.
* :mod:`cwa.perturbation.apply` — :func:`apply_perturbation`, :func:`restore_exact` and the
  :func:`perturbed` context manager: in place, saving only the selected originals, verified by
  whole-tensor checksums (:mod:`cwa.perturbation.checksum`).

This ``__init__`` stays free of torch: the registries hold lazy ``module:attr`` entries so that
``--list`` works without importing anything heavy. The public functions are importable from
here too; they load their module (and torch) on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from cwa.registry import Registry

PERTURBATION_METHODS: Registry[Any] = Registry("perturbation")
for _name, _attr, _description in (
    ("zero", "ZERO", "set each selected weight to +0.0"),
    ("sign_flip", "SIGN_FLIP", "negate each selected weight (XOR of its sign bit)"),
    ("scale", "SCALE", "multiply each selected weight by --scale"),
    (
        "gaussian_noise",
        "GAUSSIAN_NOISE",
        "add scale * std(tensor) * N(0,1) noise, seeded (scale defaults to 1.0)",
    ),
    (
        "bit_flip",
        "BIT_FLIP",
        "flip bit --bit of each weight's IEEE-754 pattern (default: top exponent bit)",
    ),
):
    PERTURBATION_METHODS.add(_name, f"cwa.perturbation.methods:{_attr}", description=_description)

SELECTIONS: Registry[Any] = Registry("selection")
for _name, _attr, _description in (
    ("top_k", "TOP_K", "the k highest-ranked weights of a rank run (the treatment)"),
    ("random_k", "RANDOM_K", "per group, the treatment's count drawn uniformly, seeded"),
    ("bottom_k", "BOTTOM_K", "per group, the treatment's count of least sensitive weights"),
    ("all_k", "ALL_K", "every weight in the scope (upper bound on damage)"),
):
    SELECTIONS.add(_name, f"cwa.perturbation.builtin_selections:{_attr}", description=_description)
# Clustered perturbation (issue 11): the members of a `cwa analyze clusters` cluster as treatment.
SELECTIONS.add(
    "cluster",
    "cwa.analysis.cluster_selection:CLUSTER",
    description="the members of cluster ID of a clusters analysis (treatment: cluster:ID)",
)

del _name, _attr, _description

# Public names served lazily from their submodules (so that importing the package is cheap).
_LAZY = {
    "apply_perturbation": "apply",
    "restore_exact": "apply",
    "perturbed": "apply",
    "PerturbationHandle": "apply",
    "PerturbationMethod": "methods",
    "get_method": "apply",
    "Selection": "selection",
    "top_k": "selection",
    "random_k": "selection",
    "bottom_k": "selection",
    "all_k": "selection",
    "ScopeEntry": "scope",
    "scope_from_params": "scope",
    "scope_from_architecture": "scope",
    "tensor_checksum": "checksum",
    "named_checksums": "checksum",
    "combine_checksums": "checksum",
}

__all__ = ["PERTURBATION_METHODS", "SELECTIONS", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cwa.perturbation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cwa.perturbation.{module}"), name)
