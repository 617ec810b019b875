"""Activation-aware metrics: ``wanda`` (and the hooks ``super_weight`` shares; that metric lives
in :mod:`cwa.metrics.super_weights`).

Both run forward passes only (``torch.inference_mode``) over the calibration set, with hooks on
the modules that own the selected weights. Activations are taken at every real (non-padding)
token position of the inputs; padding positions are excluded with the attention mask.

``wanda`` (Sun et al. 2023): score_ij = |W_ij| * ||X_j||_2, X_j = the j-th *input* channel of the
module over all calibration tokens (captured by forward pre-hooks). Orientation: ``nn.Linear``
stores W as [out, in] (the norm multiplies columns), GPT-2's ``Conv1D`` stores it as [in, out]
(the norm multiplies rows). Only weights of Linear / Conv1D modules are scored; embeddings,
positional embeddings, norms and biases have no input-channel activation and are left out of
the score file (listed in the config as ``not_scored``). A tied ``lm_head`` is a Linear whose
weight *is* the token embedding: that tensor is scored through its lm_head use (input = final
hidden states), under the embedding's parameter name.

``super_weight``: see :mod:`cwa.metrics.super_weights`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from cwa.errors import InvalidInput, UnsupportedArchitecture
from cwa.metrics.base import MetricSpec, ScoringContext, check_finite_loss, count_targets, token_nll


@dataclass
class _HookedWeight:
    name: str
    module: torch.nn.Module
    input_axis: int  # axis of the weight indexing input channels (1 for Linear, 0 for Conv1D)

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[self.input_axis])

    @property
    def out_features(self) -> int:
        return int(self.module.weight.shape[1 - self.input_axis])


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def linear_weights(model: torch.nn.Module) -> dict[str, _HookedWeight]:
    """Parameter name -> owning Linear/Conv1D module, for every matmul weight of the model."""
    conv1d = _conv1d_class()
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights counted once
    found: dict[str, _HookedWeight] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            axis = 1
        elif conv1d is not None and isinstance(module, conv1d):
            axis = 0
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or id(weight) not in names:
            continue
        name = names[id(weight)]
        if name in found:
            raise UnsupportedArchitecture(
                f"weight {name!r} is shared by two linear modules; activation metrics cannot "
                "attribute its inputs; use a gradient metric instead"
            )
        found[name] = _HookedWeight(name, module, axis)
    return found


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _real_tokens(x: torch.Tensor, token_mask: torch.Tensor, name: str) -> torch.Tensor:
    """[n_real_tokens, channels] view of the activations at real (non-padding) positions."""
    if tuple(x.shape[:-1]) != tuple(token_mask.shape):
        raise UnsupportedArchitecture(
            f"activations of {name!r} have shape {tuple(x.shape)}, not [batch, tokens, channels]; "
            "activation metrics cannot exclude padding here; use a gradient metric"
        )
    # Under a device map the module may live on another device than the token ids.
    return x.reshape(-1, x.shape[-1])[token_mask.reshape(-1).to(x.device)]


def _forward_calibration(
    ctx: ScoringContext, token_mask_holder: list[torch.Tensor], task: str
) -> None:
    """Run every calibration batch forward (no grad), exposing its real-token mask to hooks."""
    assert ctx.batches is not None
    n_targets, n_sequences = count_targets(ctx.batches)
    device = ctx.device
    total = torch.zeros((), dtype=torch.float64)
    handle = ctx.reporter.task(task, len(ctx.batches))
    try:
        with torch.inference_mode():
            for index, batch in enumerate(ctx.batches):
                mask = batch.get("attention_mask")
                ids = batch["input_ids"]
                real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                token_mask_holder[:] = [real.to(device)]
                nll, _ = token_nll(ctx.model, batch, device)
                batch_sum = nll.sum()
                check_finite_loss(batch_sum, f"batch {index}")
                total += batch_sum.double().cpu()
                handle.advance()
    finally:
        handle.close()
        token_mask_holder.clear()
    from cwa import distributed

    distributed.sum_(total)  # torchrun: add the other ranks' shares (identity otherwise)
    ctx.loss, ctx.n_tokens, ctx.n_sequences = float(total / n_targets), n_targets, n_sequences


# -- wanda ------------------------------------------------------------------------------------


def _device_of(ctx: ScoringContext, name: str) -> torch.device:
    device = ctx.parameters[name].device
    return ctx.device if device.type == "meta" else device


def _wanda_plan(ctx: ScoringContext) -> list[str]:
    owners = linear_weights(ctx.model)
    plan = [name for name in ctx.selected if name in owners]
    if not plan:
        raise InvalidInput(
            "wanda scores only linear/Conv1D weights and none of the selected parameters is one; "
            "select attention or MLP components"
        )
    return plan


def _wanda(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    owners = linear_weights(ctx.model)
    plan = [name for name in ctx.selected if name in owners]
    sum_squares = {  # on each weight's own device (device maps spread them)
        n: torch.zeros(owners[n].in_features, dtype=torch.float32, device=_device_of(ctx, n))
        for n in plan
    }
    token_mask: list[torch.Tensor] = []

    def make_hook(name: str):  # noqa: ANN202 - torch hook signature
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _real_tokens(_first_input(args, kwargs), token_mask[0], name)
            total = sum_squares[name]
            total.add_(x.float().square().sum(dim=0).to(total.device))

        return hook

    with ExitStack() as stack:
        for name in plan:
            handle = owners[name].module.register_forward_pre_hook(
                make_hook(name), with_kwargs=True
            )
            stack.callback(handle.remove)
        _forward_calibration(ctx, token_mask, "wanda: batches")
    ctx.config.update(
        definition="|W_ij| * ||X_j||_2, X_j = input channel j over all real calibration tokens",
        scored="weights of nn.Linear and transformers Conv1D modules (tied lm_head under the "
        "embedding's name)",
        not_scored=[n for n in ctx.selected if n not in owners],
    )
    from cwa import distributed

    for name in plan:
        # torchrun: sum the squared norms over ranks before the square root.
        norms = distributed.sum_(sum_squares.pop(name)).sqrt_()
        score = ctx.parameters[name].detach().float().abs()
        if owners[name].input_axis == 1:  # Linear [out, in]
            score.mul_(norms[None, :])
        else:  # Conv1D [in, out]
            score.mul_(norms[:, None])
        yield name, score
        del score


WANDA = MetricSpec(
    name="wanda",
    version="1",
    owns_output=True,
    description="|W_ij| * ||X_j||_2 over calibration tokens, for linear/Conv1D weights only",
    compute=_wanda,
    plan=_wanda_plan,
)


def __getattr__(name: str) -> Any:
    # super_weight moved to cwa.metrics.super_weights; the old lazy target keeps working.
    if name == "SUPER_WEIGHT":
        from cwa.metrics.super_weights import SUPER_WEIGHT

        return SUPER_WEIGHT
    raise AttributeError(f"module 'cwa.metrics.activations' has no attribute {name!r}")
