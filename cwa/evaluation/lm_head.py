"""A chunked LM head: next-token log-likelihoods without a [batch, tokens, vocab] logits tensor.

A causal LM is a backbone (embeddings, blocks, final norm) followed by a linear LM head. The
float32 logits of a whole batch dominate memory for large vocabularies (16 x 256 tokens x 49k
vocab = 0.8 GB, plus the same again for their gradient). Here the backbone runs once, the
final hidden states of the positions that are actually scored are gathered, and the head is
applied to them in chunks of at most :data:`CHUNK_BYTES` of float32 logits. With gradients
on, the first-order gradients w.r.t. the hidden states and the head weight are formed chunk by
chunk during the forward (:class:`_FusedHeadNLL`), so no logits are kept or recomputed; for
second-order metrics the first-order gradients are a differentiable function whose own backward
(:class:`_HeadGradient`) recomputes one chunk's logits at a time, so a Hessian-vector product
keeps no [positions, vocab] tensor either.

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
    """Inside: the head's forward skips the first-order gradients (a Hessian metric's backward
    builds them as a differentiable function anyway)."""
    _SECOND_ORDER[0] += 1
    try:
        yield
    finally:
        _SECOND_ORDER[0] -= 1


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """One float32 logits buffer for every chunk of a pass (None: mixed/half dtypes).

    A fresh 64 MB tensor per chunk would be mapped and zero-filled by the kernel each time
    (~10% of the head's time on one core)."""
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        n = int(hidden.shape[0])
        return torch.empty(min(rows, n), weight.shape[0], device=hidden.device)
    return None


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None
) -> torch.Tensor:
    if buffer is not None:
        return torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
    return (h @ weight.t()).float()


def _softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(softmax in the logits' own memory, row max, row sum of exp(logit - max)).

    One exp pass: torch's logsumexp would make a second, separate one over the chunk."""
    peak = logits.amax(dim=1)
    probs = logits.sub_(peak[:, None]).exp_()
    total = probs.sum(dim=1)
    probs.mul_(total.reciprocal()[:, None])
    return probs, peak, total


def _rows_of(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.arange(t.shape[0], device=device)


class _FusedHeadNLL(torch.autograd.Function):
    """NLL of a linear head whose first-order gradients are computed during the forward.

    Per chunk: logits, log-sum-exp, NLL, and (softmax - onehot) turned at once into the
    gradients w.r.t. the hidden states and the head weight (float32 sum); the logits are then
    freed. Backward scales them by the upstream gradient, which callers make uniform (a sum
    of NLL over tokens divided by a count). A non-uniform upstream gradient, a backward that
    builds a graph (Hessian metrics), or ``eager=False`` (inside :func:`second_order`, where
    the forward skips the gradients) go through :class:`_HeadGradient` instead.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int, eager: bool) -> torch.Tensor:  # fmt: skip
        need_h = eager and ctx.needs_input_grad[0]
        need_w = eager and ctx.needs_input_grad[1]
        n = int(hidden.shape[0])
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:  # float32 sum over chunks, whatever the weight dtype
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buffer = _logits_buffer(hidden, weight, rows)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h, y = hidden[start:stop], targets[start:stop]
            logits = _chunk_logits(h, weight, buffer)
            picked = logits.gather(1, y[:, None])[:, 0]
            probs, peak, total = _softmax_(logits)
            nll[start:stop] = total.log().add_(peak).sub_(picked)
            if not (need_h or need_w):
                continue
            # d nll / d logits = softmax - onehot.
            probs[_rows_of(probs, probs.device), y] -= 1.0
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
        ctx.fused = (grad_h, grad_w) if eager else None
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        fused, ctx.fused = ctx.fused, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        uniform = grad_nll.numel() == 0 or bool((grad_nll == grad_nll[0]).all())
        if fused is not None and uniform and not torch.is_grad_enabled():
            grad_h, grad_w = fused
            scale = grad_nll[0] if grad_nll.numel() else 0.0
            gh = None if grad_h is None else grad_h.mul_(scale)
            gw = None if grad_w is None else grad_w.mul_(scale).to(weight.dtype)
            return gh, gw, None, None, None
        del fused
        # Explicit gradient formula, chunk by chunk, as a function that is itself
        # differentiable (a graph is being built for a Hessian-vector product). No
        # autograd.grad here: with a tied head weight it would also follow the hidden states
        # back into the embedding.
        gh, gw = _HeadGradient.apply(hidden, weight, targets, grad_nll, ctx.rows)
        return (gh if need_h else None), (gw if need_w else None), None, None, None


class _HeadGradient(torch.autograd.Function):
    """(dS/dh, dS/dW) of S = sum_i c_i * nll_i for a linear head, and their own backward.

    Forward: per chunk, a_i = c_i (softmax(W h_i) - onehot(y_i)); dS/dh_i = a_i W and
    dS/dW = sum_i a_i h_i^T. Backward, given upstream U (for dS/dh) and V (for dS/dW) -- the
    second half of a Hessian-vector product through the head -- with p_i the softmax and
    r_i = W U_i + V h_i (one row of logits-sized numbers per position):

    * d/dh_i = a_i V + D_i W and d/dW = sum_i a_i U_i^T + D_i h_i^T, where
      D_i = c_i p_i * (r_i - p_i . r_i) is the softmax Jacobian applied to c_i r_i;
    * d/dc_i = (p_i - onehot(y_i)) . r_i.

    Every chunk's logits are recomputed and freed: no [positions, vocab] tensor is kept from
    one pass to the next (the double backward of checkpointed chunks kept all of them in the
    first-order graph until the last probe).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                scale: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n = int(hidden.shape[0])
        grad_h = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buffer = _logits_buffer(hidden, weight, rows)
        c = scale.float()
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h, y = hidden[start:stop], targets[start:stop]
            probs, _, _ = _softmax_(_chunk_logits(h, weight, buffer))
            probs[_rows_of(probs, probs.device), y] -= 1.0
            delta = probs.mul_(c[start:stop, None])
            grad_h[start:stop] = delta.to(weight.dtype) @ weight
            grad_w.addmm_(delta.t(), h.float())
            del probs, delta
        ctx.rows = rows
        ctx.save_for_backward(hidden, weight, targets, scale)
        return grad_h, grad_w.to(weight.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, up_h: torch.Tensor | None,
                 up_w: torch.Tensor | None) -> tuple[Any, ...]:  # fmt: skip
        hidden, weight, targets, scale = ctx.saved_tensors
        need_h, need_w, _, need_c, _ = ctx.needs_input_grad
        n, rows = int(hidden.shape[0]), ctx.rows
        w32 = weight.float()
        up_w = None if up_w is None else up_w.float()
        c = scale.float()
        d_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        d_c = torch.zeros(n, dtype=torch.float32, device=hidden.device) if need_c else None
        buffer = _logits_buffer(hidden, weight, rows)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h, y = hidden[start:stop].float(), targets[start:stop]
            probs, _, _ = _softmax_(_chunk_logits(hidden[start:stop], weight, buffer))
            r = torch.zeros_like(probs)
            if up_h is not None:
                r.addmm_(up_h[start:stop].float(), w32.t())
            if up_w is not None:
                r.addmm_(h, up_w.t())
            p_dot_r = torch.einsum("ij,ij->i", probs, r)
            if d_c is not None:
                d_c[start:stop] = p_dot_r - r.gather(1, y[:, None])[:, 0]
            cs = c[start:stop, None]
            jac = r.sub_(p_dot_r[:, None]).mul_(probs).mul_(cs)  # D, in r's memory
            probs[_rows_of(probs, probs.device), y] -= 1.0
            delta = probs.mul_(cs)  # a
            d_h[start:stop] = jac @ w32
            d_w.addmm_(jac.t(), h)
            if up_w is not None:
                d_h[start:stop] += delta @ up_w
            if up_h is not None:
                d_w.addmm_(delta.t(), up_h[start:stop].float())
            del probs, r, jac, delta
        return (
            d_h.to(hidden.dtype) if need_h else None,
            d_w.to(weight.dtype) if need_w else None,
            None,
            d_c.to(scale.dtype) if d_c is not None else None,
            None,
        )


def chunked_nll(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Float32 NLL of ``targets`` [N] given final hidden states [N, H], chunk by chunk.

    With gradients enabled, a bias-free head computes its first-order gradients during the
    forward (:class:`_FusedHeadNLL`: no logits kept, none recomputed); twice differentiable
    through :class:`_HeadGradient` (chunks recomputed, never kept). A head with a bias is
    checkpointed per chunk instead: its logits are freed after the forward and recomputed
    during backward (twice differentiable, but a double backward keeps them).
    """
    n = int(hidden.shape[0])
    vocab = int(head.weight.shape[0])
    rows = chunk_rows(vocab, chunk_bytes)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if grad and getattr(head, "bias", None) is None and n:
        # Inside second_order() the forward skips the first-order gradients: the backward
        # builds them as a differentiable function (_HeadGradient) anyway.
        return _FusedHeadNLL.apply(hidden, head.weight, targets, rows, not _SECOND_ORDER[0])
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
