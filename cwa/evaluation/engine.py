"""Batched log-likelihood scoring of (context, continuation) requests on a causal LM.

This is the model side of lm-evaluation-harness's ``HFLM.loglikelihood`` for causal models,
as of harness v0.4.9.2 (the release that delegated BOS handling to the tokenizer, PR #3347):

* Tokenization (``encode_pair``): trailing whitespace of the context moves to the start of
  the continuation; ``context + continuation`` and ``context`` are encoded separately and the
  continuation tokens are the tail of the whole encoding after ``len(context tokens)``.
  Strings are encoded with the tokenizer's own default for special tokens
  (``add_special_tokens`` left unset, so a tokenizer that prepends BOS -- Llama, Gemma --
  gets it, GPT-2 does not), except that a string already starting with the BOS text gets
  no second one. ``add_bos_token=True/False`` overrides this, as the harness's model argument
  does (``False`` reproduces harness releases before 0.4.9.2 for non-Gemma models). An empty
  context is replaced by the prefix token (BOS, else EOS) unless the continuation already
  starts with it.
* Scoring (``score_requests``): the input is ``(context + continuation)[-(max_length+1):][:-1]``
  (left truncation to the model length), right-padded, with no attention mask (the causal
  mask already hides the padding on the right); the log-likelihood is the sum of the
  continuation tokens' log-probabilities and ``is_greedy`` says whether every continuation
  token is the argmax. Log-probabilities are ``logit - logsumexp(logits)`` in float32 (the
  harness takes ``log_softmax`` in the model dtype: the same up to float rounding for float32
  models, more accurate for half precision).

Batching: requests are grouped by item (the four endings of a HellaSwag item share a group),
items are ordered by context length, longest first, and whole items are packed into batches of
at most ``batch_size`` sequences; one forward pass per batch; continuation
log-probabilities are gathered with tensor indexing (no per-token Python loop). When the model
accepts ``logits_to_keep`` only the positions from the earliest continuation start onwards go
through the LM head. Requests of a batch that share a context (the endings of a
multiple-choice item) are scored from one copy of it: one row per context with its endings
packed behind it under a block attention mask (:mod:`cwa.evaluation.prefix_cache`; the same
numbers up to float rounding).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cwa.errors import InvalidInput
from cwa.progress import NULL_REPORTER, Reporter

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when neither config nor tokenizer says
_TOKENIZER_NO_LIMIT = 10**29  # transformers' "no max length" sentinel is ~1e30


@dataclass(frozen=True)
class TokenRequest:
    """A tokenized request: score ``continuation`` after ``context``; ``group`` = item index."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    group: int = 0


def model_max_length(model: Any, tokenizer: Any = None) -> int:
    """The model's context length, looked up as the harness does."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _TOKENIZER_NO_LIMIT:
        return tok_max
    return DEFAULT_MAX_LENGTH


def model_device(model: Any) -> torch.device:
    """Where token ids go: the input embedding's device (also under a device map)."""
    from cwa.models.device_map import input_device

    return input_device(model)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def prefix_token_id(tokenizer: Any) -> int:
    """The token standing in for an empty context: BOS when the tokenizer has one, else EOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise InvalidInput(
            "the tokenizer has neither a BOS nor an EOS token, needed for an empty context"
        )
    return int(eos)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], *, add_bos_token: bool | None = None
) -> list[list[int]]:
    """Encode strings as the harness's ``tok_encode`` does (see the module docstring).

    Each distinct string is encoded once (a multiple-choice context recurs per ending).
    """
    if not texts:
        return []
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < len(texts):
        encoded = _encode_distinct(tokenizer, distinct, add_bos_token)
        by_text = dict(zip(distinct, encoded, strict=True))
        return [list(by_text[t]) for t in texts]
    return _encode_distinct(tokenizer, texts, add_bos_token)


def _encode_distinct(
    tokenizer: Any, texts: Sequence[str], add_bos_token: bool | None
) -> list[list[int]]:
    if add_bos_token is not None:
        return [
            list(ids)
            for ids in tokenizer(list(texts), add_special_tokens=add_bos_token)["input_ids"]
        ]
    bos_text = None
    if getattr(tokenizer, "bos_token_id", None) is not None:
        bos_text = tokenizer.decode([prefix_token_id(tokenizer)])
    result: list[list[int] | None] = [None] * len(texts)
    plain = [i for i, t in enumerate(texts) if not (bos_text and t.startswith(bos_text))]
    with_bos = [i for i, t in enumerate(texts) if bos_text and t.startswith(bos_text)]
    for indices, kwargs in ((plain, {}), (with_bos, {"add_special_tokens": False})):
        if not indices:
            continue
        encoded = tokenizer([texts[i] for i in indices], **kwargs)["input_ids"]
        for i, ids in zip(indices, encoded, strict=True):
            result[i] = list(ids)
    return [ids if ids is not None else [] for ids in result]


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    add_bos_token: bool | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Context and continuation token ids of each (context, continuation), harness style."""
    contexts: list[str] = []
    wholes: list[str] = []
    empty_context: list[int] = []
    for i, (context, continuation) in enumerate(pairs):
        stripped = context.rstrip()
        # Trailing spaces belong to the continuation so that " word" tokenizes as in the text.
        continuation = context[len(stripped) :] + continuation
        if not stripped:
            empty_context.append(i)
        contexts.append(stripped)
        wholes.append(stripped + continuation)
    ctx_enc = encode_texts(tokenizer, contexts, add_bos_token=add_bos_token)
    whole_enc = encode_texts(tokenizer, wholes, add_bos_token=add_bos_token)
    out = [(c, w[len(c) :]) for c, w in zip(ctx_enc, whole_enc, strict=True)]
    if empty_context:
        prefix = prefix_token_id(tokenizer)
        conts = encode_texts(tokenizer, [wholes[i] for i in empty_context], add_bos_token=False)
        for i, cont in zip(empty_context, conts, strict=True):
            if cont and cont[0] == prefix:
                out[i] = (cont[:1], cont[1:])
            else:
                out[i] = ([prefix], cont)
    return out


def plan_batches(requests: Sequence[TokenRequest], batch_size: int) -> list[list[int]]:
    """Request indices per batch: items ordered by context length (longest first, then by
    total length), an item's requests kept together.

    Ordering by context length puts requests whose continuations start at nearly the same
    position in one batch, so the span of positions sent through the LM head stays short.
    """
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.group, []).append(i)

    def total_len(i: int) -> int:
        return len(requests[i].context) + len(requests[i].continuation)

    def group_key(g: int) -> tuple[int, int, int]:
        members = groups[g]
        return (
            -min(len(requests[i].context) for i in members),
            -max(total_len(i) for i in members),
            g,
        )

    batches: list[list[int]] = []
    current: list[int] = []
    for g in sorted(groups, key=group_key):
        members = sorted(groups[g], key=lambda i: (-total_len(i), i))
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        while len(members) > batch_size:  # an item larger than a batch is split
            batches.append(members[:batch_size])
            members = members[batch_size:]
        current.extend(members)
    if current:
        batches.append(current)
    return batches


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward wrappers
        return False


def score_requests(
    model: Any,
    requests: Sequence[TokenRequest],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    reporter: Reporter | None = None,
    description: str = "scoring",
    share_contexts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood (float64) and is-greedy (bool) of every request, in request order.

    ``share_contexts``: a batch whose requests share a context (multiple choice) scores that
    context once with the continuations packed behind it (:mod:`cwa.evaluation.prefix_cache`)
    where the model supports it; False always feeds every ``context + continuation`` whole.
    """
    reporter = reporter or NULL_REPORTER
    n = len(requests)
    logliks = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.bool)
    if n == 0:
        return logliks, greedy
    max_length = max_length or model_max_length(model)
    for i, req in enumerate(requests):
        if not req.continuation:
            raise InvalidInput(f"request {i} has an empty continuation; nothing to score")
        if not req.context:
            raise InvalidInput(f"request {i} has an empty context; use encode_pairs")
        if len(req.continuation) > max_length:
            raise InvalidInput(
                f"request {i}: continuation of {len(req.continuation)} tokens exceeds the "
                f"model length {max_length}"
            )
    device = model_device(model)
    keep_logits = _accepts_logits_to_keep(model)
    from cwa import distributed
    from cwa.evaluation.prefix_cache import (
        score_shared_batch,
        shared_members,
        supports_prefix_cache,
    )

    share_contexts = share_contexts and supports_prefix_cache(model)
    handle = reporter.task(description, n)

    try:
        with eval_mode(model):
            for number, batch in enumerate(plan_batches(requests, batch_size)):
                if not distributed.owns(number):  # torchrun: another rank scores this batch
                    continue
                rest = list(batch)
                if share_contexts:
                    members = [requests[i] for i in batch]
                    picked = [batch[i] for i in shared_members(members, max_length)]
                    scored = None
                    if picked:
                        from cwa.evaluation.lm_head import split_model

                        scored = score_shared_batch(
                            model, [requests[i] for i in picked], device, split_model(model)
                        )
                    if scored is not None:
                        index = torch.tensor(picked, dtype=torch.long)
                        logliks[index], greedy[index] = scored
                        taken = set(picked)
                        rest = [i for i in batch if i not in taken]
                if rest:
                    ll, gr = _score_batch(
                        model, [requests[i] for i in rest], max_length, device, keep_logits
                    )
                    index = torch.tensor(rest, dtype=torch.long)
                    logliks[index] = ll
                    greedy[index] = gr
                handle.advance(len(batch))
    finally:
        handle.close()
    # torchrun: each request was scored on exactly one rank (zeros elsewhere): exact sums.
    greedy_count = distributed.sum_(greedy.to(torch.int64))
    return distributed.sum_(logliks), greedy_count > 0


def _score_batch(
    model: Any,
    batch: Sequence[TokenRequest],
    max_length: int,
    device: torch.device,
    keep_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs: list[list[int]] = []
    conts: list[tuple[int, ...]] = []
    for req in batch:
        whole = (req.context + req.continuation)[-(max_length + 1) :]
        inputs.append(list(whole[:-1]))
        conts.append(req.continuation)
    n_rows = len(batch)
    inplens = torch.tensor([len(x) for x in inputs], dtype=torch.long)
    contlens = torch.tensor([len(c) for c in conts], dtype=torch.long)
    padded_len = int(inplens.max())
    max_cont = int(contlens.max())
    input_ids = torch.zeros((n_rows, padded_len), dtype=torch.long)
    targets = torch.zeros((n_rows, max_cont), dtype=torch.long)
    for row, (inp, cont) in enumerate(zip(inputs, conts, strict=True)):
        input_ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        targets[row, : len(cont)] = torch.tensor(cont, dtype=torch.long)
    # Row r predicts its continuation from positions [inplen - contlen, inplen).
    starts = inplens - contlens
    from cwa.evaluation.lm_head import continuation_scores, hidden_states, split_model

    split = split_model(model)
    if split is not None:
        # Chunked LM head: the head runs only at the scored positions, chunk by chunk.
        hidden = hidden_states(split[0], input_ids.to(device))
        steps = torch.arange(max_cont)
        valid = steps.unsqueeze(0) < contlens.unsqueeze(1)
        rows_idx = torch.arange(n_rows).unsqueeze(1).expand(n_rows, max_cont)[valid]
        pos_idx = (starts.unsqueeze(1) + steps.unsqueeze(0))[valid]
        picked = hidden[rows_idx.to(hidden.device), pos_idx.to(hidden.device)]
        logp, hit = continuation_scores(split[1], picked, targets[valid].to(hidden.device))
        token_lp = torch.zeros((n_rows, max_cont), dtype=torch.float32)
        token_lp[valid] = logp.cpu()
        hits = torch.ones((n_rows, max_cont), dtype=torch.bool)
        hits[valid] = hit.cpu()
        return token_lp.double().sum(dim=1), hits.all(dim=1)
    kwargs: dict[str, Any] = {"use_cache": False}
    offset = 0
    if keep_logits:
        keep = padded_len - int(starts.min())
        kwargs["logits_to_keep"] = keep
        offset = padded_len - keep
    logits = model(input_ids=input_ids.to(device), **kwargs).logits
    steps = torch.arange(max_cont)
    valid = steps.unsqueeze(0) < contlens.unsqueeze(1)
    positions = torch.where(valid, starts.unsqueeze(1) + steps.unsqueeze(0) - offset, 0)
    positions = positions.to(logits.device)
    targets = targets.to(logits.device)
    valid = valid.to(logits.device)
    # log p(token) = logit(token) - logsumexp(logits), in float32; only [rows, positions]
    # values are gathered, never a [rows, positions, vocab] copy.
    logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1).gather(1, positions)
    flat_index = positions * logits.shape[-1] + targets
    target_logits = logits.flatten(1).gather(1, flat_index)
    token_lp = (target_logits - log_norm).masked_fill(~valid, 0.0)
    best = logits.argmax(dim=-1).gather(1, positions)
    is_greedy = ((best == targets) | ~valid).all(dim=1)
    return token_lp.double().sum(dim=1).cpu(), is_greedy.cpu()


# Perplexity windows live in cwa.evaluation.windows; re-exported for the engine's callers.
from cwa.evaluation.windows import Window, score_windows  # noqa: E402

__all__ = [
    "TokenRequest",
    "Window",
    "encode_pairs",
    "encode_texts",
    "eval_mode",
    "model_device",
    "model_max_length",
    "plan_batches",
    "prefix_token_id",
    "score_requests",
    "score_windows",
]
