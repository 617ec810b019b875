"""``evaluate_model``: run evaluation tasks on an in-memory model and return metric rows.

The model is used as given -- perturbed or not, on its own device and dtype; nothing is
reloaded or copied. It is put in eval mode for the duration and handed back in the mode it
came in; gradients are off (``torch.inference_mode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cwa.errors import InvalidInput
from cwa.evaluation.base import TASKS, TaskPlan
from cwa.evaluation.tasks import plan_tasks
from cwa.progress import NULL_REPORTER, Reporter

ROW_KEYS = ("task", "metric", "value", "stderr", "n", "task_config_hash", "note")


def evaluate_model(
    model: Any,
    tokenizer: Any,
    task_specs: str | Sequence[str] | Sequence[TaskPlan],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    seq_len: int | None = None,
    stride: int | None = None,
    is_toy_model: bool = False,
    reporter: Reporter | None = None,
    add_bos_token: bool | None = None,
    text_column: str | None = None,
    item_sink: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` on each task and return one row per (task, metric).

    ``task_specs`` are ``TASK[:SOURCE]`` strings (see :mod:`cwa.evaluation.tasks`) or plans
    already made by :func:`~cwa.evaluation.tasks.plan_tasks` (then ``limit``, ``seed``,
    ``seq_len``, ``stride``, ``is_toy_model``, ``add_bos_token`` and ``text_column`` are
    taken from the plans). Rows: ``task, metric, value, stderr, n, task_config_hash``; stderr
    is None where it is undefined (fewer than 2 items). A non-finite value is returned as is
    and reported through ``reporter.warn``. Rows carry ``note`` (what part of a perplexity
    text was scored, when not all of it). ``item_sink``: a list that receives one dict per
    evaluated item (HellaSwag, LAMBADA) with ``task`` and ``task_config_hash`` added.
    """
    reporter = reporter or NULL_REPORTER
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if (
        not isinstance(task_specs, str)
        and task_specs
        and all(isinstance(p, TaskPlan) for p in task_specs)
    ):
        plans = list(task_specs)  # type: ignore[arg-type]
    else:
        plans = plan_tasks(
            task_specs,  # type: ignore[arg-type]
            limit=limit,
            seed=seed,
            seq_len=seq_len,
            stride=stride,
            is_toy_model=is_toy_model,
            add_bos_token=add_bos_token,
            text_column=text_column,
        )
    rows: list[dict[str, Any]] = []
    for plan in plans:
        task = TASKS.get(plan.task)()
        reporter.info(f"evaluating {plan.task} on {plan.source.describe()}")
        note = plan.options.get("note")
        if note:
            reporter.info(f"{plan.task}: {note}")
        values = task.run(model, tokenizer, plan, batch_size=batch_size, reporter=reporter)
        if item_sink is not None:
            item_sink += [
                {"task": plan.task, **item, "task_config_hash": plan.config_hash}
                for item in task.item_records
            ]
        for v in values:
            if v.value != v.value or v.value in (float("inf"), float("-inf")):
                reporter.warn(f"{plan.task} {v.metric} is {v.value} (the model output diverged)")
            rows.append(
                {
                    "task": plan.task,
                    "metric": v.metric,
                    "value": float(v.value),
                    "stderr": None if v.stderr is None else float(v.stderr),
                    "n": int(v.n),
                    "task_config_hash": plan.config_hash,
                    "note": note,
                }
            )
    return rows
