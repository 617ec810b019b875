"""The task registry and the pieces every evaluation task shares (light: no torch import).

A task is a class registered in :data:`TASKS` (``Registry("task")``). It names its data
(the toy file, the hub dataset used when no source is given), a version that enters the task
configuration hash, and a ``run`` method that scores an in-memory model and returns
:class:`MetricValue` rows. Task modules import torch only inside ``run`` so that listing or
planning tasks stays fast.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cwa.errors import InvalidInput
from cwa.registry import Registry

if TYPE_CHECKING:
    from cwa.progress import Reporter

#: The lm-evaluation-harness release whose task definitions and tokenization are matched.
HARNESS_VERSION = "0.4.9.2"


@dataclass(frozen=True)
class SourceRef:
    """Where a task's data comes from.

    ``kind`` is ``toy``, ``file`` or ``hf``; ``location`` the file path or hub spec;
    ``identity`` what enters the configuration hash (content sha256 for files, the normalised
    spec for hub datasets), so a moved but identical file keeps its hash.
    """

    kind: str
    location: str
    identity: dict[str, Any]
    is_default_hub: bool = False

    def describe(self) -> str:
        return "toy" if self.kind == "toy" else self.location


@dataclass(frozen=True)
class TaskPlan:
    """One resolved ``TASK:SOURCE`` spec with the options that determine its results."""

    task: str
    source: SourceRef
    limit: int | None
    seed: int
    options: dict[str, Any]
    config: dict[str, Any]
    config_hash: str


@dataclass
class MetricValue:
    """One aggregated metric of one task."""

    metric: str
    value: float
    stderr: float | None
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


class EvalTask:
    """Base class of the registered evaluation tasks."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    #: toy data name passed to ``cwa.toy.toy_data_path``.
    toy_data: ClassVar[str] = ""
    #: hub spec used for the ``hf`` source and for non-toy models without a source.
    hub_default: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    #: per-item records of the last ``run`` (see :mod:`cwa.evaluation.records`); tasks
    #: without items (perplexity) leave it empty.
    item_records: list[dict[str, Any]]
    #: options (``TaskPlan.options`` keys) that change this task's results.
    relevant_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.item_records = []

    def run(
        self,
        model: Any,
        tokenizer: Any,
        plan: TaskPlan,
        *,
        batch_size: int,
        reporter: Reporter | None = None,
    ) -> list[MetricValue]:
        raise NotImplementedError


class ItemTask(EvalTask):
    """A task over the records of a file or hub dataset (HellaSwag, LAMBADA): loading,
    validating (``parse_item(record, where)``, a DataError naming the record) and seeded
    subsampling (``--limit``) in one place."""

    @staticmethod
    def parse_item(record: Any, where: str) -> Any:
        raise NotImplementedError

    def load(self, plan: TaskPlan) -> list[Any]:
        return [item for _, item in self.load_indexed(plan)]

    def load_indexed(self, plan: TaskPlan) -> list[tuple[int, Any]]:
        """(index in the source, item) of the items to evaluate."""
        from cwa.evaluation.items import load_items

        items = load_items(plan.source, type(self).parse_item)
        return [(i, items[i]) for i in subsample_indices(len(items), plan.limit, plan.seed)]


TASKS: Registry[type[EvalTask]] = Registry("task")


def check_limit(limit: int | None) -> int | None:
    """Validate ``--limit``: None (all items) or an integer >= 1."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidInput(f"--limit must be a whole number >= 1, got {limit!r}")
    if limit < 1:
        raise InvalidInput(f"--limit must be at least 1, got {limit}; omit it to use every item")
    return limit


def subsample_indices(n_items: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the items to evaluate: all of them, or ``limit`` drawn with ``seed``.

    The draw is ``random.Random(seed).sample`` and the result is sorted, so the items keep
    their file order; the same (n_items, limit, seed) always gives the same subset.
    """
    if limit is None or limit >= n_items:
        return list(range(n_items))
    return sorted(random.Random(seed).sample(range(n_items), limit))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean as the harness computes it: sample std (n-1) / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    variance = sum((v - mu) ** 2 for v in values) / (n - 1)
    return (variance / n) ** 0.5


def bootstrap_perplexity_stderr(
    logliks: Sequence[float], *, iters: int = 10_000, seed: int = 0
) -> float | None:
    """Bootstrap standard error of ``exp(-mean(logliks))`` (the harness's ``perplexity``).

    The harness resamples with Python's ``random`` (100000 draws by default); this draws
    ``iters`` resamples with a seeded NumPy generator, vectorised: the same estimator with a
    different random stream, so values agree up to Monte-Carlo error (about 1% at 10000).
    """
    import numpy as np

    values = np.asarray(logliks, dtype=np.float64)
    n = values.size
    if n < 2 or not np.all(np.isfinite(values)):
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, min(iters, 4_000_000 // n))
    stats: list[np.ndarray] = []
    done = 0
    while done < iters:
        size = min(chunk, iters - done)
        idx = rng.integers(0, n, size=(size, n))
        stats.append(np.exp(-values[idx].mean(axis=1)))
        done += size
    return float(np.concatenate(stats).std(ddof=1))
