"""Checks and readers the score-file analyzers share (profile, stability, drift, correlation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cwa.errors import InvalidInput


def scored_names(inputs: Any, run: Any, arch: Any) -> list[str]:
    """The run's scored parameters in architecture order; fails clearly when a file is missing
    or names a tensor the model's architecture lacks (validation, before registering)."""
    path = inputs.score_path(run)
    if not path.is_file():
        raise InvalidInput(
            f"score run {run.run_id} has no score file at {path}; its artifacts were removed: "
            "re-run the score stage"
        )
    header = inputs.score_header(run)
    unknown = [name for name in header if name not in arch.params]
    if unknown:
        raise InvalidInput(
            f"score file of run {run.run_id} has tensor {unknown[0]!r} that model "
            f"{run.model_ref!r} lacks; was the model changed after scoring?"
        )
    return [name for name in arch.params if name in header]


def common_names(inputs: Any, runs: Sequence[Any], arch: Any) -> list[str]:
    """Parameters scored in every run (architecture order); the runs must agree on shapes."""
    per_run = [scored_names(inputs, run, arch) for run in runs]
    shared = set(per_run[0]).intersection(*per_run[1:])
    if not shared:
        raise InvalidInput("the runs have no scored tensor in common; nothing to compare")
    headers = [inputs.score_header(run) for run in runs]
    for name in shared:
        shapes = {h[name] for h in headers}
        if len(shapes) > 1:
            raise InvalidInput(f"tensor {name!r} has different shapes in the runs: {shapes}")
    return [name for name in per_run[0] if name in shared]


def read_scores(reader: Any, name: str) -> np.ndarray:
    """One score tensor as a flat float32 numpy array (a view when stored as float32)."""
    import torch

    tensor = reader.get(name)
    if tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.numpy().reshape(-1)


def total_scored(inputs: Any, run: Any, names: Sequence[str]) -> int:
    """Scored (non-NaN) weights of the run's tensors ``names``, from ``tensor_stats``."""
    stats = inputs.tensor_stats(run)
    if stats.height:
        wanted = stats.filter(stats["parameter"].is_in(list(names)))
        if wanted.height == len(names):
            return int(wanted["numel"].sum() - wanted["nonfinite"].fill_null(0).sum())
    header = inputs.score_header(run)
    return int(sum(int(np.prod(header[name])) for name in names))
