"""Evaluation: perplexity, HellaSwag and LAMBADA (lm-evaluation-harness definitions).

Public API (imported lazily so that ``import cwa.evaluation`` stays light):

* :func:`evaluate_model` (``cwa.evaluation.runner``) -- metric rows for an in-memory model;
* :func:`plan_tasks`, :func:`parse_task_spec` (``cwa.evaluation.tasks``) -- resolve
  ``TASK:SOURCE`` specs and compute task configuration hashes without a model;
* :data:`TASKS` -- the task registry (``Registry("task")``).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "evaluate_model": "cwa.evaluation.runner",
    "plan_tasks": "cwa.evaluation.tasks",
    "parse_task_spec": "cwa.evaluation.tasks",
    "TASKS": "cwa.evaluation.tasks",
    "TaskPlan": "cwa.evaluation.base",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cwa.evaluation' has no attribute {name!r}")
