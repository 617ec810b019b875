"""Perplexity windows on a causal LM: summed next-token NLL and token counts per window.

A window is a token sequence whose tokens from ``score_from`` on are scored, each with the
logits at the position before it (:mod:`cwa.evaluation.perplexity` cuts a text into
windows). Windows are batched in order, right-padded, with no attention mask (the causal mask
hides the padding on the right). Where the model is a plain backbone + linear head
(:func:`cwa.evaluation.lm_head.split_model`) the head runs at the scored positions only,
chunk by chunk; otherwise the model's own logits are used, with at most ``max_logit_bytes``
of them per forward pass. Under torchrun each rank scores the batches it owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cwa.errors import InvalidInput
from cwa.progress import NULL_REPORTER, Reporter


@dataclass(frozen=True)
class Window:
    """A token window whose tokens at positions >= ``score_from`` (and >= 1) are scored."""

    tokens: torch.Tensor  # 1-D long
    score_from: int


def score_windows(
    model: Any,
    windows: Sequence[Window],
    *,
    batch_size: int = 16,
    reporter: Reporter | None = None,
    description: str = "perplexity",
    max_logit_bytes: int = 2 << 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) and number of scored tokens (long) of every window, in order.

    Token ``t`` of a window is scored with the logits at ``t - 1``. Forward passes hold at
    most ``max_logit_bytes`` of float32 logits, so a large vocabulary lowers the rows per pass.
    """
    reporter = reporter or NULL_REPORTER
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    n = len(windows)
    nll = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    if n == 0:
        return nll, counts
    from cwa.evaluation.engine import eval_mode, model_device

    device = model_device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    handle = reporter.task(description, n)
    from cwa import distributed

    try:
        with eval_mode(model):
            start = 0
            number = 0
            while start < n:
                longest = max(int(w.tokens.numel()) for w in windows[start : start + batch_size])
                rows = batch_size
                if vocab:
                    rows = max(1, min(batch_size, max_logit_bytes // (longest * vocab * 4)))
                chunk = windows[start : start + rows]
                if distributed.owns(number):  # torchrun: else another rank scores this chunk
                    s, c = _score_window_batch(model, chunk, device)
                    nll[start : start + len(chunk)] = s
                    counts[start : start + len(chunk)] = c
                    handle.advance(len(chunk))
                start += len(chunk)
                number += 1
    finally:
        handle.close()
    # torchrun: each window was scored on exactly one rank (zeros elsewhere): exact sums.
    return distributed.sum_(nll), distributed.sum_(counts)


def _score_window_batch(
    model: Any, chunk: Sequence[Window], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([int(w.tokens.numel()) for w in chunk], dtype=torch.long)
    padded_len = int(lengths.max())
    input_ids = torch.zeros((len(chunk), padded_len), dtype=torch.long)
    for row, w in enumerate(chunk):
        input_ids[row, : w.tokens.numel()] = w.tokens
    score_from = torch.tensor([max(1, w.score_from) for w in chunk], dtype=torch.long)
    positions = torch.arange(1, padded_len)
    scored = (positions.unsqueeze(0) >= score_from.unsqueeze(1)) & (
        positions.unsqueeze(0) < lengths.unsqueeze(1)
    )
    targets = input_ids[:, 1:].masked_fill(~scored, -100)
    from cwa.evaluation.lm_head import chunked_nll, hidden_states, split_model

    split = split_model(model)
    if split is not None:
        # Chunked LM head at the scored positions only: no [rows, tokens, vocab] logits.
        hidden = hidden_states(split[0], input_ids.to(device))[:, :-1]
        picked = hidden[scored.to(hidden.device)]
        nll = chunked_nll(split[1], picked, input_ids[:, 1:][scored].to(hidden.device))
        per_token = torch.zeros((len(chunk), padded_len - 1), dtype=torch.float64)
        per_token[scored] = nll.double().cpu()
        return per_token.sum(dim=1), scored.sum(dim=1)
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1]
    token_nll = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        targets.to(logits.device).flatten(),
        reduction="none",
        ignore_index=-100,
    ).view(len(chunk), padded_len - 1)
    return token_nll.double().sum(dim=1).cpu(), scored.sum(dim=1)
