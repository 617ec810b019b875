"""Shared machinery of the metrics: the metric spec, the scoring context and the calibration loss.

Definitions (DESIGN.md "Algorithms"): the calibration loss L is the mean next-token negative
log-likelihood over all non-padding target tokens of the whole calibration set. A target token
at position t+1 counts when both it and its input position t are real tokens (attention mask 1),
so right and left padding are both excluded. Metrics that need gradients weight each batch's
summed NLL by 1/N (N = target tokens of the whole set), so accumulated gradients equal dL/dw.

A metric is a :class:`MetricSpec` whose ``compute(ctx)`` yields ``(parameter name, raw score)``
in the order given by ``plan(ctx)``; scores are float tensors of the parameter's shape. The
scoring driver (:mod:`cwa.metrics.scoring`) masks out-of-scope elements, checks finiteness,
casts, computes statistics and streams each tensor to the score file as it arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from cwa.errors import InvalidInput, NonFiniteError, UnsupportedArchitecture
from cwa.progress import NULL_REPORTER, Reporter

Batch = Mapping[str, torch.Tensor]
IGNORE_INDEX = -100


@dataclass
class ScoringContext:
    """Everything a metric needs, plus the slots where it reports what it did."""

    model: torch.nn.Module
    batches: Sequence[Batch] | None
    arch: Any  # cwa.models.architecture.ArchitectureMap
    selected: list[str]  # parameter names in scope (wholly or partly), architecture order
    scope_masks: dict[str, torch.Tensor | None]  # None = whole tensor in scope
    parameters: dict[str, torch.nn.Parameter]
    seed: int
    options: dict[str, Any]
    reporter: Reporter = NULL_REPORTER
    # Filled in by the metric (or by the driver when a metric needs no gradients):
    config: dict[str, Any] = field(default_factory=dict)
    loss: float | None = None
    n_tokens: int | None = None
    n_sequences: int | None = None
    extra_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where calibration inputs go: the input embedding's device (device maps included)."""
        from cwa.models.device_map import input_device

        return input_device(self.model)


ComputeFn = Callable[[ScoringContext], Iterable[tuple[str, torch.Tensor]]]
PlanFn = Callable[[ScoringContext], list[str]]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: identity, version (recorded on every run) and its functions."""

    name: str
    version: str
    description: str
    compute: ComputeFn
    plan: PlanFn | None = None  # parameters it scores; default: every selected parameter
    needs_data: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)  # allowed options and defaults
    # True when every yielded tensor is a fresh buffer the metric never touches again: the
    # driver may then sort it in place for the statistics after writing it (saves a copy).
    owns_output: bool = False
    # True when scores can be negative (curvature-based metrics): rankings and controls then
    # compare |score| by default (``cwa rank --by abs|value``).
    signed: bool = False
    # True when the metric runs backward passes through the model (gradient and Hessian
    # metrics): only those can use activation checkpointing (cwa.metrics.checkpointing).
    uses_backward: bool = False

    def planned(self, ctx: ScoringContext) -> list[str]:
        return list(ctx.selected) if self.plan is None else self.plan(ctx)


def as_metric_spec(obj: Any, name: str) -> MetricSpec:
    """Accept a MetricSpec, or wrap a plugin function ``f(ctx) -> iterable/dict of scores``.

    A plain function may carry ``version``, ``needs_data``, ``options``, ``signed`` and
    ``uses_backward`` attributes.
    """
    if isinstance(obj, MetricSpec):
        return obj
    if not callable(obj):
        raise InvalidInput(f"metric {name!r} is neither a MetricSpec nor a callable")
    doc = (obj.__doc__ or "").strip().splitlines()
    func = obj

    def compute(ctx: ScoringContext) -> Iterable[tuple[str, torch.Tensor]]:
        result = func(ctx)
        if isinstance(result, Mapping):  # dict results are yielded in plan order
            return ((n, result[n]) for n in ctx.selected if n in result)
        return result

    return MetricSpec(
        name=getattr(obj, "name", name),
        version=str(getattr(obj, "version", "0")),
        description=doc[0] if doc else "",
        compute=compute,
        needs_data=bool(getattr(obj, "needs_data", True)),
        options=dict(getattr(obj, "options", {})),
        signed=bool(getattr(obj, "signed", False)),
        uses_backward=bool(getattr(obj, "uses_backward", False)),
    )


# -- seeding --------------------------------------------------------------------------------


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and labels (e.g. probe index, parameter name).

    Seeding per parameter makes a parameter's random numbers independent of which other
    parameters are selected, and identical across devices (generated on CPU).
    """
    text = ":".join([str(int(seed)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def cpu_generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derived_seed(seed, *parts))


# Row b holds the 8 signs encoded by the bits of byte b (bit i -> entry i; set = +1, clear = -1).
_SIGNS_OF_BYTE = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float().mul_(2).sub_(1)


def rademacher(
    shape: Sequence[int], generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A float32 CPU tensor of independent +-1 entries with probability 1/2 each.

    Draws one random byte per 8 entries and looks the 8 signs up in a table (one gather pass;
    ~3x faster than ``randint(0, 2)`` then converting, ~5x faster than ``bernoulli_``).
    ``out``: an optional float32 buffer of at least ``8 * ceil(numel / 8)`` elements to fill
    instead of allocating (reused across probes).
    """
    n = 1
    for d in shape:
        n *= int(d)
    n_bytes = (n + 7) // 8
    random_bytes = torch.randint(0, 256, (n_bytes,), generator=generator, dtype=torch.uint8)
    if out is None:
        out = torch.empty(n_bytes * 8, dtype=torch.float32)
    rows = out[: n_bytes * 8].view(n_bytes, 8)
    torch.index_select(_SIGNS_OF_BYTE, 0, random_bytes.long(), out=rows)
    return out[:n].view(*shape)


# -- calibration batches and the loss ---------------------------------------------------------


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: position t predicts token t+1 and both are real (the last column is False)."""
    real = attention_mask.bool()
    mask = torch.zeros_like(real)
    mask[:, :-1] = real[:, :-1] & real[:, 1:]
    return mask


def _attention_mask(batch: Batch) -> torch.Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return torch.ones_like(ids) if mask is None else mask


def count_targets(batches: Sequence[Batch]) -> tuple[int, int]:
    """(non-padding target tokens, sequences with at least one target) over all batches."""
    tokens = 0
    sequences = 0
    for batch in batches:
        if "input_ids" not in batch:
            raise InvalidInput("calibration batch has no 'input_ids'; build it with token_blocks")
        per_row = target_mask(_attention_mask(batch)).sum(dim=1)
        tokens += int(per_row.sum())
        sequences += int((per_row > 0).sum())
    if tokens == 0 and getattr(batches, "global_counts", None) is None:
        raise InvalidInput(
            "the calibration batches contain no non-padding target tokens; use longer sequences"
        )
    # A torchrun shard (cwa.distributed.shard_batches) answers with the whole set's counts,
    # so every rank weights its batches by the full-set N.
    return getattr(batches, "global_counts", None) or (tokens, sequences)


def token_nll(
    model: torch.nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T] (0 at non-targets, float32) and the target mask [B, T]."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = _attention_mask(batch).to(device)
    mask = target_mask(attention_mask)
    from cwa.evaluation.lm_head import split_model, token_nll_chunked

    split = split_model(model)
    if split is not None:
        # Backbone once, LM head per chunk of target positions: never [B, T, vocab] logits.
        return token_nll_chunked(split, input_ids, attention_mask, mask), mask
    # Labels aligned with logits (label[t] = token t+1) so no shifted copy of the logits is made.
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels.masked_fill(~mask, IGNORE_INDEX)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    vocab = logits.shape[-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab).float(),
        labels.reshape(-1).to(logits.device),  # the head's device under a device map
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(input_ids.shape).to(input_ids.device), mask


def check_finite_loss(value: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"the calibration loss is not finite ({where}); check the model weights, or load "
            "it in float32 (--dtype float32)"
        )


def calibration_loss(
    model: torch.nn.Module, batches: Sequence[Batch], reporter: Reporter | None = None
) -> tuple[float, int]:
    """(L, N): mean next-token NLL over all non-padding targets, and N, without gradients."""
    from cwa.models.device_map import input_device

    device = input_device(model)
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    handle = (reporter or NULL_REPORTER).task("calibration loss (batches)", len(batches))
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                nll, mask = token_nll(model, batch, device)
                batch_sum = nll.sum()
                check_finite_loss(batch_sum, f"batch {index}")
                total += batch_sum.double().cpu()
                tokens += int(mask.sum())
                handle.advance()
    finally:
        handle.close()
    from cwa import distributed

    distributed.sum_(total)  # torchrun: every rank's share of the sum (identity otherwise)
    tokens = distributed.sum_int(tokens)
    if tokens == 0:
        raise InvalidInput("the calibration batches contain no non-padding target tokens")
    return float(total / tokens), tokens


# -- model state helpers ----------------------------------------------------------------------


@contextmanager
def gradients_only_for(
    model: torch.nn.Module, params: Sequence[torch.nn.Parameter]
) -> Iterator[None]:
    """Let only ``params`` require grad (skips weight-gradient work elsewhere); restore after.

    Also clears ``.grad`` of the selected parameters before and after.
    """
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
            if id(p) in wanted:
                p.grad = None
        yield
    finally:
        for p, flag in saved:
            if id(p) in wanted:
                p.grad = None
            p.requires_grad_(flag)


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


@contextmanager
def double_backward_attention(model: torch.nn.Module) -> Iterator[str]:
    """Make attention twice differentiable; yields a label for the run config.

    Eager attention is plain autograd ops. For SDPA we force PyTorch's math backend, which
    supports double backward (the fused flash / memory-efficient kernels do not). Any other
    implementation (flash_attention_2, flex, ...) is refused with the fix.
    """
    from cwa.evaluation.lm_head import second_order  # the chunked head stays differentiable

    impl = attention_implementation(model)
    if impl == "eager":
        with second_order():
            yield "eager"
        return
    if impl == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]), second_order():
            yield "sdpa (math backend)"
        return
    raise UnsupportedArchitecture(
        f"second-order metrics need twice-differentiable attention but the model uses "
        f"{impl!r}; load it with attn_implementation='eager'"
    )
