"""Token-level perplexity on held-out text.

Text and split: the documents of the source are tokenized into one stream as for calibration
(:func:`cwa.data.text.token_stream`: no special tokens, EOS between documents) and only the
held-out part is scored: the last ``heldout_fraction`` (0.1) of the stream for a local file or
an explicit hub spec -- the part :func:`cwa.data.text.token_blocks` never hands out for
calibration -- and the whole stream for ``toy`` (the toy held-out file, generated separately
from the calibration file) and for the default hub source (WikiText-2 raw *test* split).

Windows:

* default (no ``stride``): consecutive non-overlapping windows of ``seq_len`` tokens (the last
  one may be shorter; one of fewer than 2 tokens is dropped). Each window starts without
  context, so its first token is context only and the ``len - 1`` others are scored.
* ``stride=S`` (1 <= S <= seq_len): sliding windows as in the Hugging Face perplexity guide:
  windows of ``seq_len`` tokens start every ``S`` tokens and each scores only the tokens not
  scored by the previous window, so every token but the first of the stream is scored exactly
  once, with at least ``seq_len - S`` tokens of context (except near the start).

``seq_len`` defaults to ``min(model length, 1024)``. ``limit`` keeps a seeded subset of the
windows. Metrics: ``perplexity`` = exp(mean NLL over all scored tokens), ``nll`` (mean NLL per
token, nats), ``tokens`` (number of scored tokens). Their stderr: sample std of the per-window
mean NLL / sqrt(windows) for ``nll`` and, by the delta method, ``perplexity * stderr(nll)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cwa.data.text import load_hf_texts, load_text_file, split_bounds, token_stream
from cwa.errors import DataError, InvalidInput
from cwa.evaluation.base import (
    TASKS,
    EvalTask,
    MetricValue,
    TaskPlan,
    mean_stderr,
    subsample_indices,
)

if TYPE_CHECKING:
    import torch

    from cwa.evaluation.engine import Window
    from cwa.progress import Reporter

DEFAULT_SEQ_LEN_CAP = 1024
HELDOUT_FRACTION = 0.1


def make_windows(stream: torch.Tensor, seq_len: int, stride: int | None) -> list[Window]:
    """The scoring windows of a token stream (see the module docstring)."""
    from cwa.evaluation.engine import Window

    n = int(stream.numel())
    windows: list[Window] = []
    if stride is None:
        for begin in range(0, n, seq_len):
            piece = stream[begin : begin + seq_len]
            if piece.numel() >= 2:
                windows.append(Window(piece, 1))
        return windows
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        new_tokens = end - prev_end
        piece = stream[begin:end]
        windows.append(Window(piece, max(1, piece.numel() - new_tokens)))
        prev_end = end
        if end == n:
            break
    return [w for w in windows if w.tokens.numel() >= 2]


@TASKS.register("perplexity", description="token-level perplexity on held-out text")
class PerplexityTask(EvalTask):
    """Token-level perplexity on held-out text (non-overlapping or strided windows)."""

    name = "perplexity"
    version = "1"
    toy_data = "heldout"
    hub_default = "hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text"
    metrics = ("perplexity", "nll", "tokens")
    relevant_options = ("seq_len", "stride", "text_column", "heldout_fraction")

    @staticmethod
    def heldout_fraction(plan_source_kind: str, is_default_hub: bool) -> float:
        return 1.0 if plan_source_kind == "toy" or is_default_hub else HELDOUT_FRACTION

    def load_texts(self, plan: TaskPlan) -> list[str]:
        column = plan.options.get("text_column")
        if plan.source.kind == "hf":
            return load_hf_texts(plan.source.location, text_column=column)
        return load_text_file(plan.source.location, text_column=column)

    def run(
        self,
        model: Any,
        tokenizer: Any,
        plan: TaskPlan,
        *,
        batch_size: int,
        reporter: Reporter | None = None,
    ) -> list[MetricValue]:
        from cwa.evaluation.engine import model_max_length, score_windows

        max_len = model_max_length(model, tokenizer)
        seq_len = plan.options.get("seq_len") or min(max_len, DEFAULT_SEQ_LEN_CAP)
        if seq_len > max_len:
            raise InvalidInput(f"--seq-len {seq_len} exceeds the model length {max_len}")
        stride = plan.options.get("stride")
        if stride is not None and stride > seq_len:
            raise InvalidInput(f"--stride {stride} is larger than the window length {seq_len}")
        stream = token_stream(tokenizer, self.load_texts(plan))
        start, stop = split_bounds(
            int(stream.numel()),
            role="heldout",
            heldout_fraction=float(plan.options["heldout_fraction"]),
            allow_overlap=False,
        )
        windows = make_windows(stream[start:stop], seq_len, stride)
        if not windows:
            raise DataError(
                f"the held-out text of {plan.source.describe()!r} has {stop - start} tokens, "
                "too few to score; give more text"
            )
        windows = [windows[i] for i in subsample_indices(len(windows), plan.limit, plan.seed)]
        nll_sums, counts = score_windows(
            model, windows, batch_size=batch_size, reporter=reporter, description="perplexity"
        )
        total_tokens = int(counts.sum())
        mean_nll = float(nll_sums.sum()) / total_tokens
        per_window = (nll_sums / counts.clamp(min=1)).tolist()
        nll_err = mean_stderr(per_window)
        ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
        n = len(windows)
        return [
            MetricValue("perplexity", ppl, None if nll_err is None else ppl * nll_err, n),
            MetricValue("nll", mean_nll, nll_err, n),
            MetricValue("tokens", float(total_tokens), None, n),
        ]
