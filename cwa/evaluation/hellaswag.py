"""HellaSwag, zero-shot, exactly as lm-evaluation-harness v0.4.9.2 defines it.

Harness sources matched: ``lm_eval/tasks/hellaswag/hellaswag.yaml`` (``multiple_choice``,
``Rowan/hellaswag`` validation split, metrics ``acc`` and ``acc_norm``),
``lm_eval/tasks/hellaswag/utils.py`` (``preprocess``, ``process_docs``) and
``ConfigurableTask.construct_requests`` / ``process_results`` in ``lm_eval/api/task.py``.

* ``preprocess(text)``: strip; replace ``" [title]"`` by ``". "``; delete every
  ``[bracketed]`` span (non-greedy ``\\[.*?\\]``); replace double spaces by single ones (one
  pass, as the harness's ``str.replace``).
* query = ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` (Python's
  ``capitalize`` also lower-cases the rest of ``ctx_b``); choices = preprocessed endings;
  gold = ``int(label)``.
* One loglikelihood request per choice: context = query, continuation = ``" " + choice``
  (the default ``target_delimiter``).
* ``acc`` = 1 if argmax of the summed continuation log-likelihoods is gold; ``acc_norm``
  divides each log-likelihood by ``len(choice)``, the character length of the preprocessed
  choice *without* the leading space; ``np.argmax`` semantics (the first maximum wins).
* stderr = sample standard deviation / sqrt(n) (harness ``mean_stderr``).

Tokenization and BOS behaviour: see :mod:`cwa.evaluation.engine`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import DataError
from cwa.evaluation.base import (
    TASKS,
    ItemTask,
    MetricValue,
    TaskPlan,
    mean_stderr,
)
from cwa.evaluation.items import require_fields, require_text

if TYPE_CHECKING:
    from cwa.progress import Reporter

REQUIRED_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def preprocess(text: str) -> str:
    """The harness's HellaSwag text clean-up (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


@dataclass(frozen=True)
class HellaSwagItem:
    query: str
    choices: tuple[str, ...]
    gold: int


def item_from_record(record: Any, where: str) -> HellaSwagItem:
    """Validate one HellaSwag record and build its query, choices and gold index."""
    rec = require_fields(record, where, REQUIRED_FIELDS, "HellaSwag")
    activity = require_text(rec, "activity_label", where)
    ctx_a = require_text(rec, "ctx_a", where)
    ctx_b = require_text(rec, "ctx_b", where)
    endings = rec["endings"]
    if not isinstance(endings, (list, tuple)) or len(endings) < 2:
        raise DataError(f"{where}: field 'endings' must be a list of at least 2 strings")
    if not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where}: every entry of 'endings' must be text")
    label = rec["label"]
    try:
        gold = int(label)
        if isinstance(label, float) and label != gold:
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"{where}: field 'label' must be an integer index, got {label!r}") from None
    if not 0 <= gold < len(endings):
        raise DataError(
            f"{where}: field 'label' is {gold} but there are {len(endings)} endings (0-based)"
        )
    query = preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    return HellaSwagItem(query, tuple(preprocess(e) for e in endings), gold)


def choice_metrics(
    logliks: list[float], choices: tuple[str, ...], gold: int
) -> tuple[float, float]:
    """(acc, acc_norm) of one item from its per-choice log-likelihoods, with np.argmax ties."""
    import numpy as np

    lls = np.asarray(logliks, dtype=np.float64)
    completion_len = np.asarray([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / completion_len))
    return float(int(np.argmax(lls)) == gold), float(pred_norm == gold)


@TASKS.register("hellaswag", description="HellaSwag zero-shot acc / acc_norm (harness 0.4.9.2)")
class HellaSwagTask(ItemTask):
    """HellaSwag zero-shot acc / acc_norm (harness 0.4.9.2)."""

    name = "hellaswag"
    version = "1"
    toy_data = "hellaswag"
    hub_default = "hf:Rowan/hellaswag:validation"
    metrics = ("acc", "acc_norm")
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

        def prepare() -> tuple[tuple[tuple[int, HellaSwagItem], ...], tuple[TokenRequest, ...]]:
            indexed = self.load_indexed(plan)
            items = [item for _, item in indexed]
            pairs = [(item.query, " " + choice) for item in items for choice in item.choices]
            owners = [k for k, item in enumerate(items) for _ in item.choices]
            encoded = encode_pairs(
                tokenizer, pairs, add_bos_token=plan.options.get("add_bos_token")
            )
            requests = tuple(
                TokenRequest(tuple(ctx), tuple(cont), owner)
                for (ctx, cont), owner in zip(encoded, owners, strict=True)
            )
            return tuple(indexed), requests

        # A sweep evaluates the same items once per condition: read and tokenize them once.
        indexed, requests = prepared(plan, tokenizer, prepare)
        items = [item for _, item in indexed]
        logliks, _ = score_requests(
            model, requests, batch_size=batch_size, reporter=reporter, description="hellaswag"
        )
        values = logliks.tolist()
        accs: list[float] = []
        acc_norms: list[float] = []
        pos = 0
        for index, item in indexed:
            k = len(item.choices)
            choice_ll = values[pos : pos + k]
            acc, acc_norm = choice_metrics(choice_ll, item.choices, item.gold)
            accs.append(acc)
            acc_norms.append(acc_norm)
            pos += k
            prediction = max(range(k), key=lambda c, ll=choice_ll: (ll[c], -c))  # first max
            self.item_records.append(
                {
                    "item_index": index,
                    "gold": item.gold,
                    "prediction": prediction,
                    "acc": acc,
                    "acc_norm": acc_norm,
                    "choice_loglik": choice_ll,
                }
            )
        n = len(items)
        return [
            MetricValue("acc", sum(accs) / n, mean_stderr(accs), n),
            MetricValue("acc_norm", sum(acc_norms) / n, mean_stderr(acc_norms), n),
        ]
