"""Shared-context scoring: each context goes through the model once, its endings packed behind it.

A multiple-choice item (HellaSwag: four endings) asks for ``log p(ending | context)`` for each
ending. The plain engine feeds ``context + ending`` once per ending, so the context is
computed four times. Here each distinct context of a batch is one row of a single forward
pass, followed by all the endings that share it:

    ``context + ending_1[:-1] + ending_2[:-1] + ...``   (right-padded)

with a 4-D boolean attention mask (an ending's tokens see the whole context and their own
ending's earlier tokens, never another ending) and position ids restarting at
``len(context)`` for each ending. The context's last position predicts every ending's first
token; ending token ``t`` predicts token ``t + 1``. The LM head (chunked when the model
allows it) runs only at the scored positions. The numbers are those of the full forward up
to float rounding (the same positions, the same tokens, the same attention; only the kernel
calls differ).

Why packed and not a KV cache: the previous layout ran ``context[:-1]`` once with the KV
cache on, repeated the cache rows for the endings (a copy per layer) and ran a second pass
of ``context[-1] + ending[:-1]`` per request. On CPU that costs two passes with small matrix
products, the cache copies, and padding of every ending to the longest one in the batch.
Measured side by side (SmolLM2-135M-Instruct GGUF in float32, CPU, 1 thread, batch 16,
the first 40 toy HellaSwag items = 160 requests, ``score_requests`` on each layout in turn in
one process, best of 2 runs, CPU seconds): plain 21.70, KV-cache layout 10.26, packed 8.73
(packed/KV-cache 0.85, packed/plain 0.40). Largest log-likelihood difference from the plain
path 3.7e-5 (KV-cache layout: 2.5e-5), greedy flags and every item's argmax identical.
Per *fed token* neither shared layout is cheaper than the plain path: they feed the same
scored positions to the LM head (49k-entry vocabulary) with far fewer context tokens, so
comparing HellaSwag's time per token with LAMBADA's (about one scored token per request) is
not like for like; what counts is the time per item.

Requests equal in context *and* continuation (repeated endings) are scored once and share
the result, so equal requests get bit-equal numbers and ties between them stay ties (the
plain and KV-cache layouts gave them equal numbers because they sat in equal rows).

Padding rows: a padding query sees every earlier key (never an empty softmax) and no real
query sees a padding key (padding comes after every real token of its row); padding repeats
the row's last position id, so no position id passes the model length.

Only model types whose mask and position handling are known to follow this layout use it
(:data:`PREFIX_CACHE_MODEL_TYPES`); others, requests that would be truncated to the model
length, and batches without a shared context use the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cwa.evaluation.engine import TokenRequest

# Decoder-only models that take a prepared 4-D attention mask and explicit position ids.
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


def score_shared_batch(
    model: Any,
    batch: Sequence[TokenRequest],
    device: torch.device,
    split: tuple[Any, torch.nn.Module] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(summed log-likelihood float64, is-greedy) per request, or None where the layout does
    not fit this batch (a sliding window shorter than a packed row)."""
    # Requests identical in context and continuation are scored once (one block) and share
    # the result, so equal requests get bit-equal numbers (ties stay ties).
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, req in enumerate(batch):
        groups.setdefault(req.context, {}).setdefault(req.continuation, []).append(i)
    n_rows = len(batch)
    rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    block_rows: list[list[int]] = []  # 0 = context, j + 1 = ending j of the row
    # Per scored token: (row, position of the hidden state that predicts it), target, request.
    sel_row: list[int] = []
    sel_pos: list[int] = []
    sel_tgt: list[int] = []
    sel_req: list[int] = []  # index into ``owners``: the requests a block scores
    owners: list[list[int]] = []
    for row, (ctx, members) in enumerate(groups.items()):
        n_ctx = len(ctx)
        ids = list(ctx)
        pos = list(range(n_ctx))
        blocks = [0] * n_ctx
        for j, (cont, same) in enumerate(members.items()):
            start = len(ids)
            ids.extend(cont[:-1])
            pos.extend(range(n_ctx, n_ctx + len(cont) - 1))
            blocks.extend([j + 1] * (len(cont) - 1))
            # The context's last token predicts cont[0]; ending token t predicts cont[t + 1].
            sel_pos.extend([n_ctx - 1, *range(start, start + len(cont) - 1)])
            sel_row.extend([row] * len(cont))
            sel_tgt.extend(cont)
            sel_req.extend([len(owners)] * len(cont))
            owners.append(same)
        rows.append(ids)
        pos_rows.append(pos)
        block_rows.append(blocks)
    width = max(len(r) for r in rows)
    if _sliding_window_too_small(model, width):
        return None
    n_seq = len(rows)
    input_ids = torch.zeros((n_seq, width), dtype=torch.long)
    # Padding repeats the row's last position id (never scored, after every real token).
    position_ids = torch.zeros((n_seq, width), dtype=torch.long)
    block = torch.full((n_seq, width), -1, dtype=torch.long)
    for r, (ids, pos, blocks) in enumerate(zip(rows, pos_rows, block_rows, strict=True)):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[r, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        position_ids[r, len(pos) :] = pos[-1]
        block[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    idx = torch.arange(width)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)  # [query, key]
    q_block = block.unsqueeze(2)
    k_block = block.unsqueeze(1)
    # A real query sees context keys and keys of its own ending (causally); a padding query
    # (block -1) sees every earlier key so that its softmax is never empty.
    allowed = (k_block == 0) | (q_block == k_block) | (q_block == -1)
    mask = (allowed & causal.unsqueeze(0)).unsqueeze(1)  # [rows, 1, query, key], True = attend
    runner = split[0] if split is not None else model
    out = runner(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
    )
    rows_t = torch.tensor(sel_row, dtype=torch.long)
    pos_t = torch.tensor(sel_pos, dtype=torch.long)
    y = torch.tensor(sel_tgt, dtype=torch.long)
    req_t = torch.tensor(sel_req, dtype=torch.long)
    if split is not None:
        from cwa.evaluation.lm_head import continuation_scores

        hidden = out.last_hidden_state
        picked = hidden[rows_t.to(hidden.device), pos_t.to(hidden.device)]
        logp, hit = continuation_scores(split[1], picked, y.to(hidden.device))
    else:
        logits = out.logits[rows_t.to(out.logits.device), pos_t.to(out.logits.device)].float()
        y = y.to(logits.device)
        logp = logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        hit = logits.argmax(dim=-1) == y
    n_blocks = len(owners)
    block_ll = torch.zeros(n_blocks, dtype=torch.float64)
    block_ll.index_add_(0, req_t, logp.float().cpu().double())
    misses = torch.zeros(n_blocks, dtype=torch.long)
    misses.index_add_(0, req_t, (~hit.cpu()).long())
    request = torch.tensor([i for same in owners for i in same], dtype=torch.long)
    block_of = torch.tensor([b for b, same in enumerate(owners) for _ in same], dtype=torch.long)
    logliks = torch.zeros(n_rows, dtype=torch.float64)
    greedy = torch.zeros(n_rows, dtype=torch.bool)
    logliks[request] = block_ll[block_of]
    greedy[request] = misses[block_of] == 0
    return logliks, greedy
