"""``cluster:ID``: a stored cluster as the treatment of ``cwa perturb`` (clustered perturbation).

``cwa perturb RANK_RUN --treatment cluster:3 --controls random_k --seeds 0,1,2`` perturbs the
members of cluster 3 (table ``analysis_cluster_members``) and compares them with ``random_k``
controls that the perturb stage matches to the cluster's size in every group of the rank mode
(one group, the whole scope, for a global ranking), drawn from the same scope.

The parameter is ``ID`` — a cluster of the newest succeeded ``clusters`` analysis of the rank
run's score run (or of another score run of the same model) — or ``RUN/ID`` to name the analyze
run (id, prefix or ``latest:analyze``). The analyze run is recorded as a parent of the perturb
run with role ``clusters`` (the view ``cluster_perturbation_damage`` joins through it).

Checks before the perturb run is registered: no ``--k-values`` (the cluster is perturbed whole),
the analysis exists and is of the same model, the cluster exists and is not DBSCAN noise (-1),
and its members lie in the layers and components the ranking and the perturb options allow.
While computing, every member must lie in the perturbation scope (e.g. a score run that scored
only some tensors), or the run fails naming one.
"""

from __future__ import annotations

from typing import Any

from cwa.errors import InvalidInput
from cwa.perturbation.contract import SelectionCheck, SelectionRequest, SelectionSpec


def parse_cluster_param(param: str | None) -> tuple[str | None, int]:
    """``"3"`` -> (None, 3); ``"01J.../3"`` -> ("01J...", 3)."""
    if not param:
        raise InvalidInput(
            "the cluster treatment needs a cluster id: write cluster:ID or cluster:ANALYZE_RUN/ID "
            "(ids in table analysis_clusters)"
        )
    ref, _, text = param.rpartition("/")
    try:
        cluster_id = int(text)
    except ValueError:
        raise InvalidInput(
            f"cluster {param!r}: write cluster:ID or cluster:ANALYZE_RUN/ID with a whole-number "
            "ID (see table analysis_clusters)"
        ) from None
    return (ref.strip() or None), cluster_id


def resolve_clusters_run(store: Any, score_run: Any, ref: str | None) -> str:
    """The clusters analyze run ``ref`` names, or the newest one of ``score_run``'s model."""
    from cwa.store.runs import fetch_run, resolve_run_id

    with store.read() as con:
        if ref is not None:
            run_id = resolve_run_id(con, ref, stage="analyze", store_label=store.label)
            (n,) = con.execute(
                "SELECT count(*) FROM analysis_clusters WHERE run_id = ?", [run_id]
            ).fetchone()
            if not n:
                raise InvalidInput(
                    f"analyze run {run_id} is not a clusters analysis; give the id of a "
                    "`cwa analyze clusters` run"
                )
        else:
            row = con.execute(
                "SELECT c.run_id FROM analysis_clusters c JOIN runs r ON r.run_id = c.run_id "
                "WHERE r.status = 'succeeded' AND (c.score_run_id = ? OR "
                "(r.model_fingerprint IS NOT NULL AND r.model_fingerprint = ?)) "
                "ORDER BY c.run_id DESC LIMIT 1",
                [score_run.run_id, score_run.model_fingerprint],
            ).fetchone()
            if row is None:
                raise InvalidInput(
                    f"no clusters analysis of score run {score_run.run_id} or its model; run "
                    f"`cwa analyze clusters {score_run.run_id}` first"
                )
            run_id = str(row[0])
        analysis = fetch_run(con, run_id)
    if analysis.status != "succeeded":
        raise InvalidInput(f"clusters run {run_id} is {analysis.status}; use a succeeded one")
    if (
        analysis.model_fingerprint
        and score_run.model_fingerprint
        and analysis.model_fingerprint != score_run.model_fingerprint
    ):
        raise InvalidInput(
            f"clusters run {run_id} analysed another model than score run {score_run.run_id}; "
            "cluster a score run of the model you perturb"
        )
    return run_id


def _allowed(*lists: Any) -> set[Any] | None:
    present = [set(x) for x in lists if x]
    return set.intersection(*present) if present else None


def _check(check: SelectionCheck) -> list[tuple[str, str]]:
    from cwa.models.architecture import resolve_components

    ref, cluster_id = parse_cluster_param(check.param)
    if getattr(check.config, "k_values", None):
        raise InvalidInput(
            "a cluster treatment perturbs the whole cluster (its controls match its size); "
            "drop --k-values"
        )
    run_id = resolve_clusters_run(check.store, check.score_run, ref)
    with check.store.read() as con:
        found = con.execute(
            "SELECT size, is_noise FROM analysis_clusters WHERE run_id = ? AND cluster_id = ?",
            [run_id, cluster_id],
        ).fetchone()
        ids = [
            r[0]
            for r in con.execute(
                "SELECT cluster_id FROM analysis_clusters WHERE run_id = ? AND NOT is_noise "
                "ORDER BY cluster_id",
                [run_id],
            ).fetchall()
        ]
        places = con.execute(
            "SELECT DISTINCT layer, component FROM analysis_cluster_members "
            "WHERE run_id = ? AND cluster_id = ?",
            [run_id, cluster_id],
        ).fetchall()
    if found is None:
        raise InvalidInput(
            f"clusters run {run_id} has no cluster {cluster_id}; its clusters are "
            f"{', '.join(map(str, ids)) or 'none'}"
        )
    if found[1]:
        raise InvalidInput(
            f"cluster {cluster_id} of run {run_id} is DBSCAN noise, not a cluster; pick one of "
            f"{', '.join(map(str, ids)) or 'none'}"
        )

    def comps(x: Any) -> Any:
        return None if not x else list(resolve_components(x))

    configs = [check.score_run.config or {}, check.rank_run.config or {}]
    layers = _allowed(*(c.get("layers") for c in configs), getattr(check.config, "layers", None))
    components = _allowed(
        *(comps(c.get("components")) for c in configs),
        comps(getattr(check.config, "components", None)),
    )
    for layer, component in places:
        if (layers is not None and layer not in layers) or (
            components is not None and component not in components
        ):
            raise InvalidInput(
                f"cluster {cluster_id} has weights in layer {layer} / {component}, outside the "
                "layers/components this perturbation may touch; widen --layers/--components or "
                "use a ranking that covers them"
            )
    return [(run_id, "clusters")]


def _build(request: SelectionRequest) -> Any:
    from cwa.perturbation.selection import Selection, top_k

    ref, cluster_id = parse_cluster_param(request.param)
    run_id = resolve_clusters_run(request.store, request.score_run, ref)
    with request.store.read() as con:
        rows = con.execute(
            "SELECT parameter, flat_index FROM analysis_cluster_members "
            "WHERE run_id = ? AND cluster_id = ? ORDER BY parameter, flat_index",
            [run_id, cluster_id],
        ).fetchall()
    if not rows:
        raise InvalidInput(f"cluster {cluster_id} of run {run_id} has no members")
    parameters = [r[0] for r in rows]
    flats = [int(r[1]) for r in rows]
    chosen = top_k(parameters, flats, scope=request.scope)  # refuses members outside the scope
    return Selection(
        dict(chosen),
        kind="cluster",
        info={"clusters_run": run_id, "cluster_id": cluster_id, "size": len(rows)},
    )


CLUSTER = SelectionSpec(
    "cluster",
    "the members of cluster ID of a `cwa analyze clusters` run (treatment; cluster:ID or "
    "cluster:RUN/ID)",
    _build,
    role="treatment",
    matched=False,
    takes_param=True,
    # The parameter is required, but checked by parse_cluster_param (in check, before the run
    # is registered) so that the registry-wide contract test can look the spec up by name.
    requires_param=False,
    check=_check,
)
