"""First-order metrics: ``grad_x_weight`` and ``grad_squared`` (empirical Fisher diagonal).

``grad_x_weight`` = |w * dL/dw| with L the calibration loss (see :mod:`cwa.metrics.base`).
Each batch's summed NLL is divided by N, the number of target tokens in the whole set, before
``backward``; the batch gradients therefore sum to exactly dL/dw, whatever the batch sizes and
padding. The sum is kept in float32 for every parameter dtype: float32 parameters accumulate in
``.grad``; bf16/fp16 parameters move each batch's gradient into a float32 sum (a bf16 ``.grad``
would round every partial sum to 8 bits of mantissa). Only selected parameters require grad
during the pass. Every gradient metric accumulates in float32 (``grad_squared`` and the
Hessian metrics square / multiply float32 copies of each gradient).

``grad_squared`` is the empirical Fisher diagonal: the mean over *examples* of the squared
per-example gradient, never the square of a summed gradient. An example is one calibration
sequence by default (``micro_batch_size=1``); its loss is the mean NLL over that sequence's
non-padding target tokens. Each example gets its own forward and backward pass (batch size 1),
which keeps memory at one gradient plus one accumulator; with ``micro_batch_size=m`` an example
is a micro-batch of m consecutive sequences of a batch (faster, coarser; stated in the config).
Sequences without any target token are skipped and not counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cwa import distributed
from cwa.errors import InvalidInput
from cwa.metrics.base import (
    MetricSpec,
    ScoringContext,
    check_finite_loss,
    count_targets,
    gradients_only_for,
    token_nll,
)

LOSS_DEFINITION = "mean next-token NLL over all non-padding target tokens of the calibration set"


def _grad_x_weight(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    assert ctx.batches is not None
    n_targets, n_sequences = count_targets(ctx.batches)
    names = list(ctx.selected)
    params = [ctx.parameters[n] for n in names]
    device = ctx.device
    # float32 parameters accumulate in .grad directly (no extra memory). Half-precision ones
    # would sum the batches in bf16/fp16 (about 3 significant digits, and each addition rounds
    # again): their per-batch gradient is moved into a float32 accumulator instead.
    in_float32 = all(p.dtype == torch.float32 for p in params)
    sums: list[torch.Tensor | None] = [None] * len(params)
    ctx.config.update(
        definition="|w * dL/dw|",
        loss=LOSS_DEFINITION,
        accumulation="backward of (batch NLL sum / N) accumulated over batches in float32 "
        "(exact full-set mean)",
    )
    total = torch.zeros((), dtype=torch.float64)
    with gradients_only_for(ctx.model, params):
        handle = ctx.reporter.task("grad_x_weight: batches", len(ctx.batches))
        try:
            for index, batch in enumerate(ctx.batches):
                nll, _ = token_nll(ctx.model, batch, device)
                batch_sum = nll.sum()
                check_finite_loss(batch_sum.detach(), f"batch {index}")
                (batch_sum / n_targets).backward()
                total += batch_sum.detach().double().cpu()
                if not in_float32:
                    _move_into_float32(params, sums)
                handle.advance()
        finally:
            handle.close()
        distributed.sum_(total)  # torchrun: add the other ranks' shares (identity otherwise)
        ctx.loss, ctx.n_tokens, ctx.n_sequences = float(total / n_targets), n_targets, n_sequences
        for i, (name, param) in enumerate(zip(names, params, strict=True)):
            if in_float32:
                grad, param.grad = param.grad, None  # the gradient is ours now
            else:
                grad, sums[i] = sums[i], None
            # Sum the float32 gradient over ranks before the non-linear |w * g|.
            grad = distributed.sum_optional(grad, param)
            if grad is None:  # parameter not reached by the loss
                score = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            elif param.dtype == torch.float32:
                # Build the score in the gradient's own memory: no extra full-size tensor.
                score = grad.mul_(param.detach()).abs_()
            else:
                score = grad.mul_(param.detach().float()).abs_()
            del grad
            yield name, score
            del score  # the driver has written it; do not hold it while building the next


def _move_into_float32(params: list[torch.nn.Parameter], sums: list[torch.Tensor | None]) -> None:
    """Add each parameter's (half-precision) batch gradient to its float32 sum; clear .grad."""
    for i, param in enumerate(params):
        grad = param.grad
        if grad is None:
            continue
        if sums[i] is None:
            sums[i] = grad.float()
        else:
            sums[i].add_(grad)  # promotes to float32 inside the add: no rounded bf16 sum
        param.grad = None


def _grad_squared(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    assert ctx.batches is not None
    micro = int(ctx.options["micro_batch_size"])
    if micro < 1:
        raise InvalidInput("grad_squared micro_batch_size must be >= 1")
    n_targets, n_sequences = count_targets(ctx.batches)
    names = list(ctx.selected)
    params = [ctx.parameters[n] for n in names]
    device = ctx.device
    ctx.config.update(
        definition="mean over examples of (d loss_example / dw)^2",
        example="sequence" if micro == 1 else f"micro-batch of {micro} sequences",
        example_loss="mean NLL over the example's non-padding target tokens",
        micro_batch_size=micro,
    )
    sums: list[torch.Tensor | None] = [None] * len(params)
    total = torch.zeros((), dtype=torch.float64)
    n_examples = 0
    with gradients_only_for(ctx.model, params):
        handle = ctx.reporter.task("grad_squared: examples", n_sequences)
        try:
            for batch_index, batch in enumerate(ctx.batches):
                rows = batch["input_ids"].shape[0]
                for start in range(0, rows, micro):
                    example = {key: value[start : start + micro] for key, value in batch.items()}
                    nll, mask = token_nll(ctx.model, example, device)
                    count = int(mask.sum())
                    if count == 0:
                        continue
                    example_sum = nll.sum()
                    check_finite_loss(example_sum.detach(), f"batch {batch_index}, row {start}")
                    total += example_sum.detach().double().cpu()
                    grads = torch.autograd.grad(example_sum / count, params, allow_unused=True)
                    for i, grad in enumerate(grads):
                        if grad is None:
                            continue
                        grad = grad.float()
                        if sums[i] is None:
                            sums[i] = grad.square()
                        else:
                            sums[i].addcmul_(grad, grad)
                    del grads
                    n_examples += 1
                    handle.advance(int((mask.sum(dim=1) > 0).sum()))
        finally:
            handle.close()
    distributed.sum_(total)  # torchrun: add the other ranks' shares (identity otherwise)
    n_examples = distributed.sum_int(n_examples)
    ctx.loss, ctx.n_tokens, ctx.n_sequences = float(total / n_targets), n_targets, n_sequences
    ctx.config["n_examples"] = n_examples
    for i, (name, param) in enumerate(zip(names, params, strict=True)):
        accumulated, sums[i] = sums[i], None
        accumulated = distributed.sum_optional(accumulated, param)
        if accumulated is None:
            yield name, torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        else:
            yield name, accumulated.div_(n_examples)


GRAD_X_WEIGHT = MetricSpec(
    name="grad_x_weight",
    version="1",
    owns_output=True,
    uses_backward=True,
    description="|w * dL/dw|, L = mean next-token NLL over all calibration tokens",
    compute=_grad_x_weight,
)

GRAD_SQUARED = MetricSpec(
    name="grad_squared",
    version="1",
    owns_output=True,
    uses_backward=True,
    description="empirical Fisher diagonal: mean over sequences of squared per-sequence gradients",
    compute=_grad_squared,
    options={"micro_batch_size": 1},
)
