"""Token-level perplexity on a text file, a hub dataset or the toy held-out text.

Text: the documents of the source are tokenized into one stream as for calibration
(:func:`cwa.data.text.token_stream`: no special tokens, EOS between documents). What is scored:

* the whole stream, when the text is not the calibration text of the run being evaluated
  (a dedicated held-out file, the toy held-out file, the default WikiText-2 *test* split);
* only the held-out tail -- the last ``heldout_fraction`` of the stream, the part
  :func:`cwa.data.text.token_blocks` never hands out for calibration -- when the source is the
  calibration text (same file content or same hub spec; the calibration run's own fraction is
  used) or when ``--heldout-fraction`` is given explicitly. The result row's ``note`` says so.

Windows (``bos`` = the tokenizer's BOS convention, see :func:`cwa.data.calibration.bos_for`):

* default (no ``stride``), no BOS: consecutive non-overlapping windows of ``seq_len`` tokens
  (the last may be shorter; one of fewer than 2 tokens is dropped). Each window starts without
  context, so its first token is context only and the ``len - 1`` others are scored.
* default, BOS: each window is BOS followed by the next ``seq_len - 1`` stream tokens; BOS is
  context only and every stream token is scored, exactly once -- lm-evaluation-harness's
  rolling log-likelihood, whose first window is conditioned on the prefix token.
* ``stride=S`` (1 <= S <= seq_len): sliding windows as in the Hugging Face perplexity guide:
  windows of ``seq_len`` tokens (BOS + ``seq_len - 1`` with BOS) start every ``S`` stream
  tokens and each scores only the tokens not scored by the previous window, so every token is
  scored exactly once (without BOS, every token but the first of the stream).

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


def make_windows(
    stream: torch.Tensor, seq_len: int, stride: int | None, bos: int | None = None
) -> list[Window]:
    """The scoring windows of a token stream (see the module docstring)."""
    import torch

    from cwa.evaluation.engine import Window

    n = int(stream.numel())
    span = seq_len if bos is None else seq_len - 1  # stream tokens per window
    if span < 1:
        raise InvalidInput(f"--seq-len {seq_len} leaves no room after the BOS token; use >= 2")
    prefix = None if bos is None else torch.tensor([bos], dtype=stream.dtype)

    def window(piece: torch.Tensor, n_context: int) -> Window:
        if prefix is None:
            return Window(piece, max(1, n_context))
        # Position 0 is BOS: stream token i of the piece sits at i + 1.
        return Window(torch.cat([prefix, piece]), n_context + 1)

    windows: list[Window] = []
    if stride is None:
        for begin in range(0, n, span):
            windows.append(window(stream[begin : begin + span], 0))
    else:
        stride = min(stride, span)
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + span, n)
            piece = stream[begin:end]
            windows.append(window(piece, piece.numel() - (end - prev_end)))
            prev_end = end
            if end == n:
                break
    return [w for w in windows if w.tokens.numel() >= 2]


@TASKS.register("perplexity", description="token-level perplexity on held-out text")
class PerplexityTask(EvalTask):
    """Token-level perplexity on held-out text (non-overlapping or strided windows)."""

    name = "perplexity"
    version = "2"  # 2: whole text unless it is the calibration text; BOS-prefixed windows
    toy_data = "heldout"
    hub_default = "hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text"
    metrics = ("perplexity", "nll", "tokens")
    relevant_options = ("seq_len", "stride", "text_column", "heldout_fraction", "add_bos_token")

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
        from cwa.data.calibration import bos_for
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
        bos = bos_for(tokenizer, plan.options.get("add_bos_token"))
        windows = make_windows(stream[start:stop], seq_len, stride, bos)
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
        extra = {"bos": bos is not None}
        return [
            MetricValue("perplexity", ppl, None if nll_err is None else ppl * nll_err, n),
            MetricValue("nll", mean_nll, nll_err, n),
            MetricValue("tokens", float(total_tokens), None, n, extra),
        ]
