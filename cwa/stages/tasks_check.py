"""Reading the task files before a run is registered, so a malformed file fails first.

``plan_tasks`` resolves and hashes the sources; this reads and validates the items of every
local (``toy`` or ``file``) source of a task that loads items (HellaSwag, LAMBADA, plugins with a
``load(plan)``), and the texts of local perplexity sources. Hub datasets are left to the
compute step (loading them may need the network and minutes); their errors still fail the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cwa.errors import DataError


def check_task_files(plans: Sequence[Any]) -> None:
    """Raise DataError/InvalidInput naming the file when a local task source is unreadable."""
    from cwa.evaluation.base import TASKS

    for plan in plans:
        if plan.source.kind not in ("toy", "file"):
            continue
        task = TASKS.get(plan.task)()
        loader = getattr(task, "load", None) or getattr(task, "load_texts", None)
        if loader is None:
            continue
        items = loader(plan)
        if not items:
            raise DataError(
                f"task {plan.task}: {plan.source.describe()} holds no items; give a file with "
                "at least one record"
            )
