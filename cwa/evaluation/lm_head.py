"""A chunked LM head: next-token log-likelihoods without a [batch, tokens, vocab] logits tensor.

A causal LM is a backbone (embeddings, blocks, final norm) followed by a linear LM head. The
float32 logits of a whole batch dominate memory for large vocabularies (16 x 256 tokens x 49k
vocab = 0.8 GB, plus the same again for their gradient). Here the backbone runs once, the
final hidden states of the positions that are actually scored are gathered, and the head is
applied to them in chunks of at most :data:`CHUNK_BYTES` of float32 logits. With gradients
on, the first-order gradients w.r.t. the hidden states and the head weight are formed chunk by
chunk during the forward (:class:`_FusedHeadNLL`), so no logits are kept or recomputed; for
second-order metrics (:func:`second_order`) each chunk is checkpointed instead, so backward
recomputes one chunk's logits at a time (twice differentiable).

Only architectures whose ``forward`` is exactly ``lm_head(backbone(x).last_hidden_state)`` take
this path (:data:`CHUNKED_MODEL_TYPES`); anything else (logit soft-capping, logit scaling,
unknown models, a head with hooks on it) falls back to the model's own forward, so results
never depend on a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 64 << 20  # float32 logits per chunk (about 512 positions at a 32k vocabulary)

# forward(...) == lm_head(base_model(...).last_hidden_state) for these model types.
CHUNKED_MODEL_TYPES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2"}
)
_SCALING_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def split_model(model: Any) -> tuple[Any, torch.nn.Module] | None:
    """(backbone, lm_head) when the model is a plain backbone + linear head, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in CHUNKED_MODEL_TYPES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALING_ATTRIBUTES):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    backbone = getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model:
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        # Someone observes the head's [batch, tokens, hidden] input (e.g. wanda on a tied
        # lm_head): give them the model's own forward.
        return None
    return backbone, head


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    """Positions per chunk so that one chunk's float32 logits stay within ``chunk_bytes``."""
    budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return max(1, budget // (4 * max(1, int(vocab))))


def _nll_of_chunk(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def hidden_states(backbone: Any, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


_SECOND_ORDER = [0]  # > 0 while a caller needs twice-differentiable NLL (Hessian metrics)


@contextmanager
def second_order() -> Iterator[None]:
    """Inside: the head is checkpointed (twice differentiable), never fused."""
    _SECOND_ORDER[0] += 1
    try:
        yield
    finally:
        _SECOND_ORDER[0] -= 1


class _FusedHeadNLL(torch.autograd.Function):
    """NLL of a linear head whose first-order gradients are computed during the forward.

    Per chunk: logits, log-sum-exp, NLL, and (softmax - onehot) turned at once into the
    gradients w.r.t. the hidden states and the head weight (float32 sum); the logits are then
    freed. Backward scales them by the upstream gradient, which callers make uniform (a sum
    of NLL over tokens divided by a count); a non-uniform upstream gradient, or a backward
    that builds a graph, recomputes the chunks with differentiable ops instead.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int) -> torch.Tensor:  # fmt: skip
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = int(hidden.shape[0])
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:  # float32 sum over chunks, whatever the weight dtype
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # One logits buffer for every chunk: a fresh 64 MB tensor per chunk would be mapped
        # and zero-filled by the kernel each time (~10% of the head's time on one core).
        buffer = None
        if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
            buffer = torch.empty(min(rows, n), weight.shape[0], device=hidden.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h, y = hidden[start:stop], targets[start:stop]
            if buffer is not None:
                logits = torch.mm(h, weight.t(), out=buffer[: stop - start])
            else:
                logits = (h @ weight.t()).float()
            picked = logits.gather(1, y[:, None])[:, 0]
            # log-sum-exp and softmax from one exp pass in the logits' own memory (torch's
            # logsumexp would make a second, separate exp pass over the chunk).
            peak = logits.amax(dim=1)
            probs = logits.sub_(peak[:, None]).exp_()
            total = probs.sum(dim=1)
            nll[start:stop] = total.log().add_(peak).sub_(picked)
            # d nll / d logits = softmax - onehot.
            probs.mul_(total.reciprocal_()[:, None])
            probs[torch.arange(stop - start, device=probs.device), y] -= 1.0
            if grad_h is not None:
                if probs.dtype == weight.dtype:
                    torch.mm(probs, weight, out=grad_h[start:stop])
                else:
                    grad_h[start:stop] = probs.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h if h.dtype == torch.float32 else h.float())
            del logits, probs
        del buffer
        ctx.rows = rows
        ctx.save_for_backward(hidden, weight, targets)
        ctx.fused = (grad_h, grad_w)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        grad_h, grad_w = ctx.fused
        ctx.fused = (None, None)
        uniform = grad_nll.numel() == 0 or bool((grad_nll == grad_nll[0]).all())
        if uniform and not torch.is_grad_enabled():
            scale = grad_nll[0] if grad_nll.numel() else 0.0
            gh = None if grad_h is None else grad_h.mul_(scale)
            gw = None if grad_w is None else grad_w.mul_(scale).to(weight.dtype)
            return gh, gw, None, None
        # Recompute (rare: see the class docstring) with the explicit gradient formula, in
        # differentiable ops when a graph is being built. No autograd.grad here: with a tied
        # head weight it would also follow the hidden states back into the embedding.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        parts_h = []
        gw = None
        if need_w:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, int(hidden.shape[0]), ctx.rows):
            h, y = hidden[s : s + ctx.rows], targets[s : s + ctx.rows]
            probs = torch.softmax((h @ weight.t()).float(), dim=-1)
            onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
            delta = (probs - onehot) * grad_nll[s : s + ctx.rows, None]
            if need_h:
                parts_h.append(delta.to(weight.dtype) @ weight)
            if need_w:
                gw = gw + delta.t() @ h.float()
        gh = torch.cat(parts_h) if need_h and parts_h else None
        if gw is not None:
            gw = gw.to(weight.dtype)
        return gh, gw, None, None


def chunked_nll(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Float32 NLL of ``targets`` [N] given final hidden states [N, H], chunk by chunk.

    With gradients enabled, a bias-free head computes its first-order gradients during the
    forward (:class:`_FusedHeadNLL`: no logits kept, none recomputed); inside
    :func:`second_order`, or for a head with a bias, each chunk is checkpointed instead: its
    logits are freed after the forward and recomputed during backward (twice differentiable).
    """
    n = int(hidden.shape[0])
    vocab = int(head.weight.shape[0])
    rows = chunk_rows(vocab, chunk_bytes)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if grad and not _SECOND_ORDER[0] and getattr(head, "bias", None) is None and n:
        return _FusedHeadNLL.apply(hidden, head.weight, targets, rows)
    pieces = []
    for start in range(0, n, rows):
        h, y = hidden[start : start + rows], targets[start : start + rows]
        if grad:
            from torch.utils.checkpoint import checkpoint

            pieces.append(checkpoint(_nll_of_chunk, head, h, y, use_reentrant=False))
        else:
            pieces.append(_nll_of_chunk(head, h, y))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def token_nll_chunked(
    split: tuple[Any, torch.nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Per-position NLL [B, T] (float32, 0 where ``mask`` is False) of token t+1 at position t."""
    backbone, head = split
    hidden = hidden_states(backbone, input_ids, attention_mask=attention_mask)
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    flat_mask = mask.reshape(-1)
    picked = hidden.reshape(-1, hidden.shape[-1])[flat_mask]
    nll = chunked_nll(head, picked, targets.reshape(-1)[flat_mask], chunk_bytes=chunk_bytes)
    out = torch.zeros(flat_mask.shape[0], dtype=torch.float32, device=nll.device)
    out = out.masked_scatter(flat_mask.to(nll.device), nll)
    return out.view(input_ids.shape)


def continuation_scores(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) float32 [N], target is the argmax [N]) from hidden states [N, H].

    log p = logit(target) - logsumexp(logits) in float32, as the unchunked engine computes it.
    """
    vocab = int(head.weight.shape[0])
    rows = chunk_rows(vocab, chunk_bytes)
    logps, greedy = [], []
    for start in range(0, int(hidden.shape[0]), rows):
        logits = head(hidden[start : start + rows]).float()
        y = targets[start : start + rows]
        norm = torch.logsumexp(logits, dim=-1)
        logps.append(logits.gather(1, y[:, None])[:, 0] - norm)
        greedy.append(logits.argmax(dim=-1) == y)
        del logits
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    return torch.cat(logps), torch.cat(greedy)
