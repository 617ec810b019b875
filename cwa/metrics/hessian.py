"""Second-order metrics: ``hutchinson_diag`` and ``obd``.

Hutchinson's estimator: diag(H) = E[z * Hz] for Rademacher z (entries +-1). Each probe draws
ONE z spanning all selected parameters (elements outside the selected layers/components of a
partly selected tensor get z = 0, so the probe covers exactly the selection), and multiplies it
by the Hessian of the full calibration loss L (DESIGN.md): for every batch, g = dL_b/dw with
``create_graph=True``, then d(g . z)/dw, with the same 1/N weighting as the gradient metrics,
so Hz is the product with the Hessian of L itself. The estimate is the mean of z * Hz over
probes. Padding never counts as a target. The first-order graph of a batch is shared by all
probes (see :func:`hutchinson_diagonal`).

z is generated on CPU from a generator seeded by (seed, probe, parameter name), so results are
device independent and a parameter's probes do not depend on the rest of the selection.

Double backward needs twice-differentiable attention: eager attention is used as is, SDPA is
run on PyTorch's math backend, other implementations are refused (load with
``attn_implementation="eager"``).

``obd`` (Optimal Brain Damage, LeCun et al. 1990) is 0.5 * diag(H) * w^2 with the Hutchinson
diagonal. Both can be negative where the loss is locally non-convex along a weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cwa import distributed
from cwa.errors import InvalidInput
from cwa.metrics.base import (
    MetricSpec,
    ScoringContext,
    check_finite_loss,
    count_targets,
    cpu_generator,
    double_backward_attention,
    gradients_only_for,
    rademacher,
    token_nll,
)
from cwa.metrics.gradients import LOSS_DEFINITION


def hessian_vector_product(
    loss: torch.Tensor, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """H v for the Hessian of ``loss`` w.r.t. ``params`` by double backward (None = zero)."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return _second_backward(grads, params, vectors, retain_graph=False)


def _second_backward(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    retain_graph: bool,
) -> list[torch.Tensor | None]:
    """d(g . v)/dw = H v, given g = dL/dw built with ``create_graph=True``."""
    terms = [
        torch.dot(g.reshape(-1), v.reshape(-1))
        for g, v in zip(grads, vectors, strict=True)
        if g is not None and g.requires_grad
    ]
    if not terms:  # the gradient does not depend on the parameters: H = 0
        return [None] * len(params)
    dot = torch.stack(terms).sum() if len(terms) > 1 else terms[0]
    return list(torch.autograd.grad(dot, params, retain_graph=retain_graph, allow_unused=True))


class _ProbeVectors:
    """Rademacher probes drawn into buffers that are reused from probe to probe.

    Probe ``p`` of parameter ``name`` is always drawn from a generator seeded by
    (seed, "hutchinson", p, name), so batches see the same z for the same probe.
    """

    def __init__(self, ctx: ScoringContext, names: list[str]) -> None:
        self._ctx = ctx
        self._names = names
        self._cpu: list[torch.Tensor | None] = [None] * len(names)
        self._device: list[torch.Tensor | None] = [None] * len(names)

    def draw(self, probe: int) -> list[torch.Tensor]:
        vectors = []
        for i, name in enumerate(self._names):
            param = self._ctx.parameters[name]
            if self._cpu[i] is None:
                self._cpu[i] = torch.empty(-(-param.numel() // 8) * 8, dtype=torch.float32)
            generator = cpu_generator(self._ctx.seed, "hutchinson", probe, name)
            z = rademacher(param.shape, generator, out=self._cpu[i])
            mask = self._ctx.scope_masks.get(name)
            if mask is not None:
                z.mul_(mask)
            if param.device.type != "cpu" or param.dtype != torch.float32:
                if self._device[i] is None:
                    self._device[i] = torch.empty_like(param)
                z = self._device[i].copy_(z)
            vectors.append(z)
        return vectors


def hutchinson_diagonal(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, estimated Hessian diagonal) for every selected parameter, in order.

    Loop order: batches outside, probes inside. For each batch the first-order graph
    (forward + ``create_graph`` backward) is built once and every probe reuses it for its
    second backward; probe p draws the same z on every batch (seeded by (seed, p, name)), and
    since z * (sum_b H_b z) = sum_b z * H_b z, accumulating per batch gives exactly the
    probe-by-probe estimate of the full-set Hessian, at the cost of one second backward per
    (batch, probe) instead of a whole Hessian-vector product.
    """
    assert ctx.batches is not None
    probes = int(ctx.options["probes"])
    if probes < 1:
        raise InvalidInput("hutchinson probes must be >= 1 (e.g. --probes 32)")
    n_targets, n_sequences = count_targets(ctx.batches)
    names = list(ctx.selected)
    params = [ctx.parameters[n] for n in names]
    device = ctx.device
    # Estimates start as the first product z * Hz, built in that product's own memory.
    estimates: list[torch.Tensor | None] = [None] * len(params)
    probe_vectors = _ProbeVectors(ctx, names)
    total = torch.zeros((), dtype=torch.float64)
    with gradients_only_for(ctx.model, params), double_backward_attention(ctx.model) as attn:
        ctx.config.update(
            definition="mean over probes of z * Hz, H = Hessian of L",
            loss=LOSS_DEFINITION,
            probes=probes,
            probe_distribution="Rademacher, one vector over all selected weights per probe",
            attention=attn,
        )
        handle = ctx.reporter.task("hutchinson: probes x batches", probes * len(ctx.batches))
        try:
            for index, batch in enumerate(ctx.batches):
                nll, _ = token_nll(ctx.model, batch, device)
                batch_sum = nll.sum()
                check_finite_loss(batch_sum.detach(), f"batch {index}")
                total += batch_sum.detach().double().cpu()
                grads = torch.autograd.grad(
                    batch_sum / n_targets, params, create_graph=True, allow_unused=True
                )
                del nll, batch_sum
                for probe in range(probes):
                    vectors = probe_vectors.draw(probe)
                    products = _second_backward(
                        grads, params, vectors, retain_graph=probe < probes - 1
                    )
                    for i, (z, hz) in enumerate(zip(vectors, products, strict=True)):
                        if hz is None:
                            continue
                        z32 = z if z.dtype == torch.float32 else z.float()
                        if estimates[i] is None:
                            estimates[i] = hz.float().mul_(z32)
                        else:
                            estimates[i].addcmul_(z32, hz.float())
                    del vectors, products
                    handle.advance()
                del grads
        finally:
            handle.close()
    distributed.sum_(total)  # torchrun: add the other ranks' shares (identity otherwise)
    ctx.loss, ctx.n_tokens, ctx.n_sequences = float(total / n_targets), n_targets, n_sequences
    del probe_vectors
    for i, (name, param) in enumerate(zip(names, params, strict=True)):
        estimate, estimates[i] = estimates[i], None
        # Every rank drew the same probes: summing z * H_b z over ranks gives the full set's.
        estimate = distributed.sum_optional(estimate, param)
        if estimate is None:  # the loss does not curve along this parameter at all
            estimate = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        yield name, estimate.div_(probes)
        del estimate


def _obd(ctx: ScoringContext) -> Iterator[tuple[str, torch.Tensor]]:
    for name, diagonal in hutchinson_diagonal(ctx):
        weight = ctx.parameters[name].detach().float()
        yield name, diagonal.mul_(weight).mul_(weight).mul_(0.5)
    ctx.config["definition"] = "0.5 * diag(H) * w^2, diag(H) by Hutchinson"


HUTCHINSON_DIAG = MetricSpec(
    name="hutchinson_diag",
    version="1",
    owns_output=True,
    uses_backward=True,
    signed=True,  # diag(H) is negative where the loss curves down
    description=(
        "Hessian diagonal by Hutchinson: mean of z*Hz, one Rademacher z over all weights per probe"
    ),
    compute=hutchinson_diagonal,
    options={"probes": 16},
)

OBD = MetricSpec(
    name="obd",
    version="1",
    owns_output=True,
    uses_backward=True,
    signed=True,  # 0.5 * diag(H) * w^2 keeps the sign of diag(H)
    description="Optimal Brain Damage saliency 0.5 * diag(H) * w^2 (Hutchinson diagonal)",
    compute=_obd,
    options={"probes": 16},
)
