"""Per-weight sensitivity metrics: the metric registry and the scoring entry point.

Built-in metrics are registered as lazy ``"module:attr"`` placeholders with their one-line
descriptions, so ``METRICS.describe()`` (``cwa score --list``) imports neither torch nor any
metric module. ``get_metric`` resolves a name (or a ``module:attr`` plugin spec, or an entry
point in the ``cwa.metrics`` group) to a :class:`cwa.metrics.base.MetricSpec`.

``score_model`` / ``ScoreOutcome`` (in :mod:`cwa.metrics.scoring`) are re-exported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cwa.registry import Registry

if TYPE_CHECKING:
    from cwa.metrics.base import MetricSpec

METRICS: Registry[Any] = Registry("metric")

# name, lazy target, one-line description (the spec objects repeat it; a test checks they agree)
BUILTIN_METRICS: tuple[tuple[str, str, str], ...] = (
    ("magnitude", "cwa.metrics.weights:MAGNITUDE", "absolute weight value |w| (no data needed)"),
    (
        "grad_x_weight",
        "cwa.metrics.gradients:GRAD_X_WEIGHT",
        "|w * dL/dw|, L = mean next-token NLL over all calibration tokens",
    ),
    (
        "grad_squared",
        "cwa.metrics.gradients:GRAD_SQUARED",
        "empirical Fisher diagonal: mean over sequences of squared per-sequence gradients",
    ),
    (
        "hutchinson_diag",
        "cwa.metrics.hessian:HUTCHINSON_DIAG",
        "Hessian diagonal by Hutchinson: mean of z*Hz, one Rademacher z over all weights per probe",
    ),
    (
        "obd",
        "cwa.metrics.hessian:OBD",
        "Optimal Brain Damage saliency 0.5 * diag(H) * w^2 (Hutchinson diagonal)",
    ),
    (
        "wanda",
        "cwa.metrics.activations:WANDA",
        "|W_ij| * ||X_j||_2 over calibration tokens, for linear/Conv1D weights only",
    ),
    (
        "super_weight",
        "cwa.metrics.super_weights:SUPER_WEIGHT",
        "Yu et al. 2024 super weights: activation spikes at MLP down-projection in/out",
    ),
    ("random", "cwa.metrics.weights:RANDOM", "seeded uniform [0, 1) scores (sanity baseline)"),
)

for _name, _target, _description in BUILTIN_METRICS:
    METRICS.add(_name, _target, description=_description)


def get_metric(name: str) -> MetricSpec:
    """Resolve a metric name or ``module:attr`` spec to a MetricSpec (plain functions wrapped)."""
    from cwa.metrics.base import as_metric_spec

    canonical = METRICS.canonical(name)
    return as_metric_spec(METRICS.get(canonical), canonical)


def list_metrics() -> list[tuple[str, str]]:
    """(name, one-line description) of every metric, without importing any metric module."""
    return METRICS.describe()


def __getattr__(attr: str) -> Any:
    # Lazy re-exports: importing cwa.metrics must not import torch.
    if attr in ("score_model", "ScoreOutcome", "STATS_COLUMNS"):
        from cwa.metrics import scoring

        return getattr(scoring, attr)
    raise AttributeError(f"module 'cwa.metrics' has no attribute {attr!r}")
