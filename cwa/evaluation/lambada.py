"""LAMBADA (OpenAI version), zero-shot, exactly as lm-evaluation-harness v0.4.9.2 defines it.

Harness source matched: ``lm_eval/tasks/lambada/lambada_openai.yaml`` (``loglikelihood``
output type, ``EleutherAI/lambada_openai`` config ``default``, split ``test``) with
``ConfigurableTask.process_results`` and the ``perplexity`` aggregation of
``lm_eval/api/metrics.py``.

* context = ``" ".join(text.split(" ")[:-1])``, target = ``" " + text.split(" ")[-1]``
  (split on a single space, as the harness's Jinja template does).
* ``acc`` = 1 if every target token is the greedy (argmax) token under teacher forcing;
  stderr = sample std / sqrt(n).
* ``perplexity`` = ``exp(-mean over documents of the summed target log-likelihood)``; its
  stderr is a bootstrap of that statistic, as in the harness (see
  :func:`cwa.evaluation.base.bootstrap_perplexity_stderr` for the resampling used).

Tokenization and BOS behaviour: see :mod:`cwa.evaluation.engine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import DataError
from cwa.evaluation.base import (
    TASKS,
    ItemTask,
    MetricValue,
    TaskPlan,
    bootstrap_perplexity_stderr,
    mean_stderr,
)
from cwa.evaluation.items import require_fields, require_text

if TYPE_CHECKING:
    from cwa.progress import Reporter


@dataclass(frozen=True)
class LambadaItem:
    context: str
    target: str


def split_text(text: str) -> tuple[str, str]:
    """(context, target) of a LAMBADA passage: all words but the last, and " " + last word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def item_from_record(record: Any, where: str) -> LambadaItem:
    rec = require_fields(record, where, ("text",), "LAMBADA")
    text = require_text(rec, "text", where)
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty")
    context, target = split_text(text)
    return LambadaItem(context, target)


@TASKS.register("lambada", description="LAMBADA (OpenAI) acc / perplexity (harness 0.4.9.2)")
class LambadaTask(ItemTask):
    """LAMBADA (OpenAI) acc / perplexity (harness 0.4.9.2)."""

    name = "lambada"
    version = "1"
    toy_data = "lambada"
    hub_default = "hf:EleutherAI/lambada_openai:default:test"
    metrics = ("acc", "perplexity")
    relevant_options = ("add_bos_token",)

    parse_item = staticmethod(item_from_record)

    def run(
        self,
        model: Any,
        tokenizer: Any,
        plan: TaskPlan,
        *,
        batch_size: int,
        reporter: Reporter | None = None,
    ) -> list[MetricValue]:
        from cwa.evaluation.engine import TokenRequest, encode_pairs, score_requests
        from cwa.evaluation.prepared import prepared

        def prepare() -> tuple[tuple[tuple[int, LambadaItem], ...], tuple[TokenRequest, ...]]:
            indexed = self.load_indexed(plan)
            encoded = encode_pairs(
                tokenizer,
                [(item.context, item.target) for _, item in indexed],
                add_bos_token=plan.options.get("add_bos_token"),
            )
            requests = tuple(
                TokenRequest(tuple(ctx), tuple(cont), k) for k, (ctx, cont) in enumerate(encoded)
            )
            return tuple(indexed), requests

        # A sweep evaluates the same items once per condition: read and tokenize them once.
        indexed, requests = prepared(plan, tokenizer, prepare)
        items = [item for _, item in indexed]
        logliks, greedy = score_requests(
            model, requests, batch_size=batch_size, reporter=reporter, description="lambada"
        )
        lls = logliks.tolist()
        accs = [float(g) for g in greedy.tolist()]
        # The target is the one right answer: gold = 1, prediction = 1 when decoded greedily.
        self.item_records = [
            {
                "item_index": index,
                "gold": 1,
                "prediction": int(acc),
                "acc": acc,
                "target_loglik": ll,
                "greedy": bool(acc),
            }
            for (index, _), ll, acc in zip(indexed, lls, accs, strict=True)
        ]
        n = len(items)
        mean_ll = sum(lls) / n
        ppl = math.exp(-mean_ll) if mean_ll > -700 else math.inf
        return [
            MetricValue("acc", sum(accs) / n, mean_stderr(accs), n),
            MetricValue("perplexity", ppl, bootstrap_perplexity_stderr(lls), n),
        ]
