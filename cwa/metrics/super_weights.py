"""``super_weight``: super-weight detection after Yu et al. 2024 ("The Super Weight in Large
Language Models"), with the activation profile the paper plots.

For every MLP down projection (forward hooks, real tokens only, ``torch.inference_mode``):
a_j = max over calibration tokens of |input channel j| and b_i = max |output channel i|. Per
projection and detection round one ``activation_profile`` row records max_j a_j, its channel,
its *spike ratio* max_j a_j / median_j a_j, and the same for the output.

Candidates. A projection yields a candidate only when BOTH spike ratios reach
``spike_threshold``: the super weight is W[i*, j*] with j* = argmax a (the input spike) and
i* = argmax b (the output spike). Default threshold 50, because: the ratio compares the spiking
channel with the median channel's own maximum over all tokens (already a tail statistic), so
ordinary projections sit at ratios of about 2-25: 2-6 in random and toy models, and in
SmolLM2-135M (512 tokens of English prose) 3-24 in 23 of its 30 layers; a super weight produces
the "massive activation" of Sun et al. 2024 and Yu et al. 2024 -- hundreds to thousands of
times typical activations: SmolLM2's spiking layers reach input/output ratios of 129/186
(layer 2), 3097/478 (layer 11) and 536/376 (layer 28). 50 sits a factor ~2 above the largest
ordinary ratio and well below real spikes; change it with the ``spike_threshold`` option.

Iterative detection (``rounds``, default 3): after a round, the weights found so far are set to
zero and the calibration set is run again; a projection whose spikes still clear the threshold
(with a different (row, column)) yields a further candidate, tagged with its round. It stops
early when a round finds nothing new. The zeroed weights are restored bit-exactly afterwards
(only their original values are kept), also on error.

Scores: |W_ij| * a_j * b_i from the first (unmodified) round, so weights joining a spiking
input channel to a spiking output channel score highest; only down-projection weights are
scored. ``row``/``column`` are indices into the tensor as stored (Linear [out, in]: row = output
channel; Conv1D [in, out]: row = input channel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from cwa.errors import InvalidInput
from cwa.metrics.activations import (
    _first_input,
    _forward_calibration,
    _HookedWeight,
    _real_tokens,
    linear_weights,
)
from cwa.metrics.base import MetricSpec, ScoringContext

DEFAULT_SPIKE_THRESHOLD = 50.0
DEFAULT_ROUNDS = 3


def _down_projections(ctx: ScoringContext) -> dict[str, _HookedWeight]:
    owners = linear_weights(ctx.model)
    return {
        name: owners[name]
        for name in ctx.selected
        if name in owners and "mlp_down" in ctx.arch.params[name].components
    }


def _plan(ctx: ScoringContext) -> list[str]:
    plan = list(_down_projections(ctx))
    if not plan:
        raise InvalidInput(
            "super_weight scores MLP down-projection weights and none is selected; include the "
            "mlp_down component"
        )
    return plan


def _activation_maxima(
    ctx: ScoringContext, downs: dict[str, _HookedWeight], label: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per projection: max |input| per input channel and max |output| per output channel."""
    device = ctx.device
    input_max = {n: torch.zeros(w.in_features, device=device) for n, w in downs.items()}
    output_max = {n: torch.zeros(w.out_features, device=device) for n, w in downs.items()}
    token_mask: list[torch.Tensor] = []

    def make_hooks(name: str):  # noqa: ANN202 - torch hook signatures
        def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _real_tokens(_first_input(args, kwargs), token_mask[0], name)
            if x.shape[0]:
                top = x.abs().amax(dim=0).float().to(input_max[name].device)
                torch.maximum(input_max[name], top, out=input_max[name])

        def post_hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            y = _real_tokens(y, token_mask[0], name)
            if y.shape[0]:
                top = y.abs().amax(dim=0).float().to(output_max[name].device)
                torch.maximum(output_max[name], top, out=output_max[name])

        return pre_hook, post_hook

    loss, tokens, sequences = ctx.loss, ctx.n_tokens, ctx.n_sequences
    with ExitStack() as stack:
        for name, owner in downs.items():
            pre_hook, post_hook = make_hooks(name)
            stack.callback(
                owner.module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove
            )
            stack.callback(owner.module.register_forward_hook(post_hook, with_kwargs=True).remove)
        _forward_calibration(ctx, token_mask, label)
    from cwa import distributed

    for name in downs:  # torchrun: spike maxima over every rank's tokens (identity otherwise)
        distributed.max_(input_max[name])
        distributed.max_(output_max[name])
    if loss is not None:  # later rounds run a modified model: keep the first round's loss
        ctx.loss, ctx.n_tokens, ctx.n_sequences = loss, tokens, sequences
    return input_max, output_max


def spike(values: torch.Tensor) -> tuple[float, int, float]:
    """(max, argmax, max / median) of per-channel maxima; ratio inf when the median is 0."""
    top = int(torch.argmax(values))
    peak = float(values[top])
    median = float(values.float().median())
    ratio = peak / median if median > 0 else (float("inf") if peak > 0 else 0.0)
    return peak, top, ratio


def detect_super_weights(
    ctx: ScoringContext, downs: dict[str, _HookedWeight], threshold: float, rounds: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[torch.Tensor, ...]]]:
    """(candidates, activation profile rows, first-round maxima) -- see the module docstring."""
    candidates: list[dict[str, Any]] = []
    profile: list[dict[str, Any]] = []
    first: dict[str, tuple[torch.Tensor, ...]] = {}
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []  # (weight, row, col, value)
    found: set[tuple[str, int, int]] = set()
    try:
        for round_no in range(1, rounds + 1):
            a_all, b_all = _activation_maxima(ctx, downs, f"super_weight: round {round_no}")
            if round_no == 1:
                first = {n: (a_all[n], b_all[n]) for n in downs}
            new: list[dict[str, Any]] = []
            for name, owner in downs.items():
                a_max, j, a_ratio = spike(a_all[name])
                b_max, i, b_ratio = spike(b_all[name])
                layer = ctx.arch.params[name].layer
                profile.append(
                    {
                        "layer": layer,
                        "parameter": name,
                        "max_input_abs": a_max,
                        "input_channel": j,
                        "input_spike_ratio": a_ratio,
                        "max_output_abs": b_max,
                        "output_channel": i,
                        "output_spike_ratio": b_ratio,
                        "round": round_no,
                    }
                )
                row, column = (i, j) if owner.input_axis == 1 else (j, i)
                if a_ratio < threshold or b_ratio < threshold or (name, row, column) in found:
                    continue
                weight = ctx.parameters[name].detach()
                new.append(
                    {
                        "layer": layer,
                        "parameter": name,
                        "row": row,
                        "column": column,
                        "input_channel": j,
                        "output_channel": i,
                        "input_activation": a_max,
                        "output_activation": b_max,
                        "weight_value": float(weight[row, column]),
                        "round": round_no,
                        "input_spike_ratio": a_ratio,
                        "output_spike_ratio": b_ratio,
                    }
                )
            candidates += new
            if not new or round_no == rounds:
                break
            with torch.no_grad():  # remove what was found, then look again
                for cand in new:
                    weight = ctx.parameters[cand["parameter"]].data
                    r, c = cand["row"], cand["column"]
                    saved.append((weight, r, c, weight[r, c].clone()))
                    found.add((cand["parameter"], r, c))
                    weight[r, c] = 0
    finally:
        with torch.no_grad():
            for weight, r, c, value in reversed(saved):
                weight[r, c] = value
    return candidates, profile, first


def _super_weight(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    threshold = float(ctx.options["spike_threshold"])
    rounds = int(ctx.options["rounds"])
    if not threshold >= 0:
        raise InvalidInput(f"super_weight spike_threshold must be >= 0, got {threshold}")
    if rounds < 1:
        raise InvalidInput(f"super_weight rounds must be at least 1, got {rounds}")
    downs = _down_projections(ctx)
    candidates, profile, first = detect_super_weights(ctx, downs, threshold, rounds)
    ctx.extra_tables["super_weights"] = candidates
    ctx.extra_tables["activation_profile"] = profile
    ctx.config.update(
        definition="|W_ij| * max|X_j| * max|Y_i| over real calibration tokens (MLP down "
        "projections, first round); candidate = (argmax output channel, argmax input channel) "
        "where both spike ratios (max / median channel) reach spike_threshold",
        spike_threshold=threshold,
        rounds=rounds,
        rounds_run=max((row["round"] for row in profile), default=0),
        n_candidates=len(candidates),
    )
    for name, owner in downs.items():
        a, b = first.pop(name)
        score = ctx.parameters[name].detach().float().abs()
        if owner.input_axis == 1:  # Linear [out, in]
            score.mul_(b[:, None]).mul_(a[None, :])
        else:  # Conv1D [in, out]
            score.mul_(a[:, None]).mul_(b[None, :])
        yield name, score
        del score


SUPER_WEIGHT = MetricSpec(
    name="super_weight",
    version="2",
    owns_output=True,
    description="Yu et al. 2024 super weights: activation spikes at MLP down-projection in/out",
    compute=_super_weight,
    plan=_plan,
    options={"spike_threshold": DEFAULT_SPIKE_THRESHOLD, "rounds": DEFAULT_ROUNDS},
)
