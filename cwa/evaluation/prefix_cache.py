"""Shared-context scoring: a context is run through the model once, its endings from its KV cache.

A multiple-choice item (HellaSwag: four endings) asks for ``log p(ending | context)`` for each
ending. The plain engine feeds ``context + ending`` once per ending, so the context is
computed four times. Here a batch's distinct contexts are run once with the KV cache on, the
cache is expanded over the requests that share each context, and only the endings go through
the model again. The numbers are those of the full forward up to float rounding (the same
positions, the same tokens, the same attention; only the kernel calls are split).

Layout (no left padding, so no query ever attends to nothing):

* prefix pass: ``context[:-1]`` of each distinct context, right-padded, no attention mask
  (the causal mask hides the padding on the right, as in the plain engine);
* ending pass: ``context[-1:] + continuation[:-1]`` of each request, right-padded; the cache
  rows are repeated for the requests of each context; the attention mask hides the prefix's
  padding slots ``[len(prefix), longest prefix)``; position ids continue each prefix. Every
  position of the ending pass predicts one continuation token, so the LM head (chunked when
  the model allows it) runs exactly where a target is scored.

Only model types whose cache and position handling are known to follow this layout use it
(:data:`PREFIX_CACHE_MODEL_TYPES`); others, requests that would be truncated to the model
length, and batches without a shared context use the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cwa.evaluation.engine import TokenRequest

# Decoder-only models with HF's Cache API, 2-D padding masks and explicit position ids.
PREFIX_CACHE_MODEL_TYPES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2"}
)


def supports_prefix_cache(model: Any) -> bool:
    """Whether ``model`` is one of the architectures the shared-context path is written for."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PREFIX_CACHE_MODEL_TYPES:
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    return callable(getattr(model, "forward", None))


def shared_members(batch: Sequence[TokenRequest], max_length: int) -> list[int]:
    """Positions in ``batch`` of the requests the cached layout serves: their context is
    shared with another such request, has at least 2 tokens, and is not truncated to the
    model length (``context + continuation <= max_length + 1``)."""
    fits = [
        i
        for i, req in enumerate(batch)
        if len(req.context) >= 2 and len(req.context) + len(req.continuation) <= max_length + 1
    ]
    counts: dict[tuple[int, ...], int] = {}
    for i in fits:
        counts[batch[i].context] = counts.get(batch[i].context, 0) + 1
    return [i for i in fits if counts[batch[i].context] >= 2]


def _sliding_window_too_small(model: Any, length: int) -> bool:
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return isinstance(window, int) and 0 < window < length


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=getattr(model, "config", None))
    except TypeError:  # transformers releases whose DynamicCache takes no config
        return DynamicCache()


def _cache_argument(runner: Any) -> str:
    """``cache`` where the forward has it (transformers >= 5.2x renamed ``past_key_values``)."""
    import inspect

    try:
        params = inspect.signature(runner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward wrappers
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def score_shared_batch(
    model: Any,
    batch: Sequence[TokenRequest],
    device: torch.device,
    split: tuple[Any, torch.nn.Module] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(summed log-likelihood float64, is-greedy) per request, or None where the layout does
    not fit this batch (a sliding window shorter than the sequences)."""
    contexts: dict[tuple[int, ...], int] = {}
    owner = [contexts.setdefault(req.context, len(contexts)) for req in batch]
    prefixes = [list(ctx[:-1]) for ctx in contexts]
    prefix_lens = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    p_max = int(prefix_lens.max())
    suffixes = [[req.context[-1], *req.continuation[:-1]] for req in batch]
    conts = [req.continuation for req in batch]
    s_lens = torch.tensor([len(s) for s in suffixes], dtype=torch.long)
    s_max = int(s_lens.max())
    if _sliding_window_too_small(model, p_max + s_max):
        return None

    prefix_ids = torch.zeros((len(prefixes), p_max), dtype=torch.long)
    for row, p in enumerate(prefixes):
        prefix_ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
    n_rows = len(batch)
    suffix_ids = torch.zeros((n_rows, s_max), dtype=torch.long)
    targets = torch.zeros((n_rows, s_max), dtype=torch.long)
    for row, (s, c) in enumerate(zip(suffixes, conts, strict=True)):
        suffix_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        targets[row, : len(c)] = torch.tensor(c, dtype=torch.long)
    rows_prefix = torch.tensor(owner, dtype=torch.long)
    own_len = prefix_lens[rows_prefix]
    # Keys: [prefix slots (padding after own_len hidden) | ending tokens (all visible; the
    # causal mask hides later ones)].
    slots = torch.arange(p_max).unsqueeze(0)
    attention = torch.cat(
        [(slots < own_len.unsqueeze(1)).long(), torch.ones((n_rows, s_max), dtype=torch.long)],
        dim=1,
    )
    # Padding after a short ending repeats its last position, so no position id passes the
    # model length (padding is never scored and comes after every real token).
    positions = torch.minimum(
        own_len.unsqueeze(1) + torch.arange(s_max).unsqueeze(0),
        (own_len + s_lens - 1).unsqueeze(1),
    )

    runner = split[0] if split is not None else model
    cache = _new_cache(model)
    key = _cache_argument(runner)
    runner(input_ids=prefix_ids.to(device), use_cache=True, **{key: cache})
    cache.batch_select_indices(rows_prefix.to(device))
    out = runner(
        input_ids=suffix_ids.to(device),
        **{key: cache},
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        use_cache=True,
    )
    valid = torch.arange(s_max).unsqueeze(0) < s_lens.unsqueeze(1)
    if split is not None:
        from cwa.evaluation.lm_head import continuation_scores

        hidden = out.last_hidden_state
        picked = hidden[valid.to(hidden.device)]
        logp, hit = continuation_scores(split[1], picked, targets[valid].to(hidden.device))
    else:
        logits = out.logits.float()[valid.to(out.logits.device)]
        y = targets[valid].to(logits.device)
        logp = logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        hit = logits.argmax(dim=-1) == y
    token_lp = torch.zeros((n_rows, s_max), dtype=torch.float32)
    token_lp[valid] = logp.float().cpu()
    hits = torch.ones((n_rows, s_max), dtype=torch.bool)
    hits[valid] = hit.cpu()
    return token_lp.double().sum(dim=1), hits.all(dim=1)
