"""Metrics that look only at the weights: ``magnitude`` and the ``random`` baseline."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cwa.metrics.base import MetricSpec, ScoringContext, cpu_generator


def _magnitude(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    ctx.config["definition"] = "|w|"
    for name in ctx.selected:
        yield name, ctx.parameters[name].detach().abs().float()


def _random(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    # One generator per parameter, seeded from (seed, name): a parameter's scores do not depend
    # on which other parameters are selected, and are generated on CPU (device independent).
    ctx.config["definition"] = "uniform [0, 1), torch CPU generator seeded from (seed, name)"
    for name in ctx.selected:
        shape = ctx.parameters[name].shape
        yield name, torch.rand(shape, generator=cpu_generator(ctx.seed, "random", name))


MAGNITUDE = MetricSpec(
    name="magnitude",
    version="1",
    owns_output=True,
    description="absolute weight value |w| (no data needed)",
    compute=_magnitude,
    needs_data=False,
)

RANDOM = MetricSpec(
    name="random",
    version="1",
    owns_output=True,
    description="seeded uniform [0, 1) scores (sanity baseline)",
    compute=_random,
    needs_data=False,
)
