"""Analyzers of stored results (``cwa analyze``): the registry and how to look one up.

Every analyzer is an :class:`cwa.analysis.base.AnalyzerSpec` (the contract is documented in
:mod:`cwa.analysis.base`). Built-in analyzers are registered below as lazy ``"module:attr"``
placeholders with their one-line descriptions, so listing them (``cwa analyze --list``) or
choosing one never imports the others. User plugins: pass ``module:attr`` where an analyzer
name is expected (or ``--plugin module:attr`` on the CLI), or declare an entry point in the
``cwa.analyzers`` group.

To add a built-in analyzer: write ``cwa/analysis/NAME.py`` defining ``ANALYZER =
AnalyzerSpec(...)``, add one line to :data:`BUILTIN_ANALYZERS`, its tables to a migration, and
its tests (the shared contract test in ``tests/test_analysis_framework.py`` runs over every
registered analyzer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cwa.registry import Registry

if TYPE_CHECKING:
    from cwa.analysis.base import AnalyzerSpec

ANALYZERS: Registry[Any] = Registry("analyzer")

# name, lazy target, one-line description (the spec repeats it; a test checks they agree)
BUILTIN_ANALYZERS: tuple[tuple[str, str, str], ...] = (
    (
        "profile",
        "cwa.analysis.profile:ANALYZER",
        "score distribution per tensor/layer/component/head, concentration, depth pattern",
    ),
    (
        "stability",
        "cwa.analysis.stability:ANALYZER",
        "top-k agreement of score runs (overlap, Jaccard, RBO, Spearman, Kendall) with CI",
    ),
    (
        "drift",
        "cwa.analysis.drift:ANALYZER",
        "per-tensor shift (KS, Wasserstein) and top-k movement between two runs",
    ),
    (
        "correlation",
        "cwa.analysis.correlation:ANALYZER",
        "metric x metric rank correlation and top-k overlap; layer x layer correlation",
    ),
    (
        "clusters",
        "cwa.analysis.clusters:ANALYZER",
        "k-means / MiniBatchKMeans / DBSCAN clusters of weights by sensitivity pattern",
    ),
    (
        "super_weights",
        "cwa.analysis.super_weights:ANALYZER",
        "super-weight activation profile and candidates; --verify ablates each candidate",
    ),
    (
        "effects",
        "cwa.analysis.effects:ANALYZER",
        "effect size of treatment vs matched controls, k/scale curves, flipped items",
    ),
)


# Other spellings accepted on the command line (the issue calls it "super-weights").
_ALIASES: dict[str, tuple[str, ...]] = {"super_weights": ("super-weights",)}

for _name, _target, _description in BUILTIN_ANALYZERS:
    ANALYZERS.add(_name, _target, description=_description, aliases=_ALIASES.get(_name, ()))


def get_analyzer(name: str) -> AnalyzerSpec:
    """Resolve an analyzer name (or ``module:attr`` plugin spec) to its AnalyzerSpec."""
    from cwa.analysis.base import as_analyzer_spec

    canonical = ANALYZERS.canonical(name)
    return as_analyzer_spec(ANALYZERS.get(canonical), canonical)


def list_analyzers() -> list[tuple[str, str]]:
    """(name, one-line description) of every analyzer, without importing any analyzer."""
    return ANALYZERS.describe()
