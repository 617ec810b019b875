"""Optional activation checkpointing of the decoder blocks during gradient metrics.

With it on, each decoder block's forward runs under ``torch.utils.checkpoint`` (the
non-reentrant variant): the forward keeps only the block's inputs, and the backward recomputes
the block's activations when it needs them. Non-reentrant checkpointing supports
``torch.autograd.grad(..., create_graph=True)`` followed by a second backward, so the Hessian
metrics (``hutchinson_diag``, ``obd``) work under it; the recomputation is the same forward on
the same inputs (eval mode, no dropout), so scores equal those of a run without it (tests check
this, and against exact Hessian diagonals).

What it saves depends on the metric (``benchmarks/bench_score_memory.py --checkpointing``
measures both side by side). A first-order backward frees each recomputed block once its
gradients are formed: peak memory 0.52-0.65x for +7-26% CPU time on the benchmark's Llama
models. A double backward keeps the first-order graph until the last probe's second backward,
and that graph holds tensors of the size of the activations (attention probabilities, gradients
of every intermediate) for every block at once; each probe's second backward also recomputes
the blocks again. Measured: the Hessian metrics' peak memory is about unchanged (1.00-1.02x) for
+2-18% CPU time, so for them the working memory knob is the calibration ``--batch-size`` (batch
losses are weighted exactly, so smaller batches give the same scores up to float rounding).

Blocks are wrapped by giving each block module an instance ``forward`` that calls the original
one through ``checkpoint``; the previous instance attribute (e.g. accelerate's device-map hook
wrapper) is restored on exit, so the model comes back exactly as it was. Transformers' own
``gradient_checkpointing_enable`` is not used: it only checkpoints in training mode, and scoring
runs in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cwa.errors import UnsupportedArchitecture

_LAYER_COUNT_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers")
_MISSING = object()


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList with one entry per hidden layer).

    Raises :class:`UnsupportedArchitecture` when the config gives no layer count or no
    ModuleList of that length exists (activation checkpointing then cannot be applied).
    """
    config = getattr(model, "config", None)
    count = None
    for attribute in _LAYER_COUNT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            count = value
            break
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and count is not None and len(module) == count
    ]
    if not candidates:
        raise UnsupportedArchitecture(
            "--activation-checkpointing needs the model's decoder blocks (a ModuleList with "
            f"config.num_hidden_layers entries) but {type(model).__name__} has none; run "
            "without --activation-checkpointing"
        )
    # The outermost such list is the decoder stack (not e.g. a per-block list of experts).
    return min(candidates, key=lambda item: item[0].count("."))[1]


def _checkpointed(forward: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing to save: plain forward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: every decoder block of ``model`` recomputes its activations during backward."""
    if not enabled:
        yield
        return
    blocks = list(decoder_blocks(model))
    saved = [block.__dict__.get("forward", _MISSING) for block in blocks]
    try:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, previous in zip(blocks, saved, strict=True):
            if previous is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
