"""Deterministic CPU training of the tiny toy language models (GPT-2 and Llama layouts).

Everything that could vary between runs is pinned: the text comes from the seeded generator in
a fixed order, rows are cut by a seeded :class:`random.Random`, weights are initialised after
``torch.manual_seed``, deterministic algorithms are switched on and the thread count is fixed
(the global torch settings are restored afterwards). The same configuration therefore gives the
same weights bit for bit on the same machine and software; a different CPU instruction set or
torch build may round differently.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from cwa.errors import InvalidInput, NonFiniteError
from cwa.progress import NULL_REPORTER, Reporter
from cwa.toy.recipe import ToyTrainConfig


def make_config(cfg: ToyTrainConfig, vocab_size: int, eos_id: int, pad_id: int):
    """The Hugging Face config of a fresh toy model (no dropout: training is deterministic)."""
    if cfg.variant == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model,
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.d_model,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id,
            eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=3 * cfg.d_model,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5, attention_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, tie_word_embeddings=False,
    )


@contextmanager
def _pinned_torch(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic algorithms for the duration, then restore."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Tiny gradients late in training become denormal floats, which are many times slower on
    # x86 CPUs; flushing them to zero changes nothing that matters here.
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def training_batches(
    docs: Iterator[list[int]], cfg: ToyTrainConfig, eos_id: int, pad_id: int
) -> tuple[list[Batch], int]:
    """All training batches in order, and how many documents they used.

    A row starts at a document start, with an EOS before it in half the rows (seeded): lm-eval
    adds no BOS for these models, other callers may. A "single" batch holds one document per
    row (plus its EOS), right-padded to the batch's longest row with padding masked out of
    attention and loss. A "packed" batch fills ``seq_len`` tokens per row with consecutive
    EOS-separated documents; a document cut at a row's end is not continued.
    """
    rng = random.Random(cfg.seed)
    pos = 0

    def next_doc() -> list[int]:
        nonlocal pos
        pos += 1
        try:
            return next(docs)
        except StopIteration:
            raise InvalidInput("toy training ran out of documents; pass a longer stream") from None

    batches: list[Batch] = []
    for step in range(cfg.steps):
        rows: list[list[int]] = []
        for _ in range(cfg.batch_size):
            row = [eos_id] if rng.random() < 0.5 else []
            row += next_doc() + [eos_id]
            while cfg.is_packed_step(step) and len(row) < cfg.seq_len:
                row += next_doc() + [eos_id]
            rows.append(row[: cfg.seq_len])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        batches.append(Batch(ids, mask, ids.masked_fill(mask == 0, -100)))
    return batches, pos


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def train_toy_model(
    cfg: ToyTrainConfig,
    tokenizer,
    documents: Iterable[str],
    reporter: Reporter | None = None,
):
    """Train a fresh toy model on ``documents`` (in their order); returns ``(model, figures)``."""
    from transformers import AutoModelForCausalLM

    reporter = reporter or NULL_REPORTER
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    with _pinned_torch(cfg.threads):
        encoded = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in documents)
        batches, n_docs = training_batches(encoded, cfg, eos_id, pad_id)
        torch.manual_seed(cfg.seed)
        hf_config = make_config(cfg, len(tokenizer), eos_id, pad_id)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        # GPT2LMHeadModel's name does not reveal its loss; say it (silences a warning)
        model.loss_type = "ForCausalLM"
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=False,
        )
        losses: list[float] = []
        task = reporter.task(f"training toy-{cfg.variant}", total=cfg.steps)
        start = time.perf_counter()
        try:
            for step in range(cfg.steps):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, cfg)
                batch = batches[step]
                loss = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels,
                ).loss
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"toy training loss became {loss.item()} at step {step}; "
                        "lower the learning rate"
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                task.advance()
        finally:
            task.close()
        train_seconds = time.perf_counter() - start
        model.eval()
    tail = losses[-max(1, min(20, len(losses))):]
    figures = {
        "config": asdict(cfg),
        "train_seconds": round(train_seconds, 2),
        "tokens_seen": int(sum(int(b.attention_mask.sum()) for b in batches)),
        "documents_seen": n_docs,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
    }
    return model, figures


@torch.no_grad()
def continuation_scores(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[tuple[float, bool]]:
    """For each (context, continuation): summed log-probability and whether greedy matches.

    Tokenised like lm-eval: the continuation's tokens are those of ``context + continuation``
    after the context's tokens; no BOS is added. Batched with right padding.
    """
    out: list[tuple[float, bool]] = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        seqs, spans = [], []
        for ctx, cont in chunk:
            ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            whole = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
            seqs.append(whole)
            spans.append((len(ctx_ids), len(whole)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, (lo, hi) in enumerate(spans):
            targets = ids[r, lo:hi]
            lp = logprobs[r, lo - 1:hi - 1]
            total = lp.gather(-1, targets[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == targets).all())
            out.append((total, greedy))
    return out


def hellaswag_query(item: dict) -> str:
    """lm-eval's HellaSwag context (the toy text needs none of its bracket clean-up)."""
    return item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize()


def task_accuracies(
    model, tokenizer, lambada: Sequence[dict], hellaswag: Sequence[dict]
) -> dict[str, float]:
    """LAMBADA greedy accuracy and HellaSwag ``acc`` (summed log-likelihood) of a toy model."""
    pairs = [(d["text"].rsplit(" ", 1)[0], " " + d["text"].rsplit(" ", 1)[1]) for d in lambada]
    lam = continuation_scores(model, tokenizer, pairs)
    hs_pairs = [(hellaswag_query(d), " " + e) for d in hellaswag for e in d["endings"]]
    hs = continuation_scores(model, tokenizer, hs_pairs)
    hits = 0
    for k, item in enumerate(hellaswag):
        scores = [s for s, _ in hs[4 * k:4 * k + 4]]
        hits += int(max(range(4), key=scores.__getitem__) == int(item["label"]))
    return {
        "lambada_acc": round(sum(g for _, g in lam) / max(1, len(lam)), 4),
        "hellaswag_acc": round(hits / max(1, len(hellaswag)), 4),
    }
