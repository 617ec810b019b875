"""Which runs a report shows: the runs asked for, their ancestors, and analyses of them.

Given a perturb run the report follows the lineage to its rank, score and baseline evaluate
runs; analyze runs whose inputs are among those runs are added too. Given an experiment label it
covers every succeeded run of that experiment (all seeds) with their ancestors. Everything here
is read from the store; nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cwa.errors import InvalidInput, RunNotFound
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id
from cwa.store.store import Store

STAGE_ORDER = ("score", "rank", "evaluate", "perturb", "analyze")


@dataclass
class RunSet:
    """The runs one report shows, with the primary score and rank runs its figures use."""

    runs: list[RunRecord]
    requested: list[str]
    experiment: str | None = None
    score_run: str | None = None
    rank_run: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def ids(self, stage: str) -> list[str]:
        return [r.run_id for r in self.runs if r.stage == stage]

    def run(self, run_id: str) -> RunRecord:
        return next(r for r in self.runs if r.run_id == run_id)

    @property
    def score_metric(self) -> str | None:
        if self.score_run is None:
            return None
        return self.run(self.score_run).config.get("metric")

    def placeholders(self) -> dict[str, str | None]:
        """SQL fragments for the catalog's placeholders (None when the report has no such run)."""

        def many(ids: list[str]) -> str | None:
            return ", ".join(f"'{i}'" for i in ids) if ids else None

        return {
            "score_run": f"'{self.score_run}'" if self.score_run else None,
            "rank_run": f"'{self.rank_run}'" if self.rank_run else None,
            "score_runs": many(self.ids("score")),
            "rank_runs": many(self.ids("rank")),
            "perturb_runs": many(self.ids("perturb")),
            "evaluate_runs": many(self.ids("evaluate")),
            "analyze_runs": many(self.ids("analyze")),
            **self.extra,
        }


def resolve_runs(store: Store, refs: Sequence[str], experiment: str | None) -> RunSet:
    """Resolve the report's runs (raises RunNotFound / InvalidInput before anything is written)."""
    with store.read() as con:
        seeds: list[str] = []
        for ref in refs:
            run_id = resolve_run_id(con, ref, store_label=store.label)
            record = fetch_run(con, run_id)
            if record.status != "succeeded":
                raise InvalidInput(
                    f"run {run_id} is {record.status}; a report shows succeeded runs only "
                    "(see `cwa runs list --status succeeded`)"
                )
            seeds.append(run_id)
        if experiment is not None:
            found = [
                r[0]
                for r in con.execute(
                    "SELECT run_id FROM runs WHERE experiment = ? AND status = 'succeeded' "
                    "AND stage <> 'report' ORDER BY run_id",
                    [experiment],
                ).fetchall()
            ]
            if not found:
                raise RunNotFound(
                    f"no succeeded runs in experiment {experiment!r}; see `cwa runs list`"
                )
            seeds.extend(found)
        if not refs and experiment is None:
            row = con.execute(
                "SELECT run_id FROM runs WHERE status = 'succeeded' AND stage <> 'report' "
                "ORDER BY stage = 'perturb' DESC, run_id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise RunNotFound(
                    "no succeeded runs to report on; run a stage first (e.g. `cwa demo`)"
                )
            seeds.append(str(row[0]))
        seeds = list(dict.fromkeys(seeds))
        chosen = set(seeds)
        placeholders = ", ".join("?" for _ in seeds)
        ancestors = con.execute(
            f"SELECT DISTINCT ancestor_run_id FROM run_lineage WHERE run_id IN ({placeholders})",
            seeds,
        ).fetchall()
        chosen.update(r[0] for r in ancestors)
        # Analyses of the same inputs: analyze runs with a parent among the chosen runs.
        inputs = sorted(chosen)
        marks = ", ".join("?" for _ in inputs)
        analyses = con.execute(
            "SELECT DISTINCT p.run_id FROM run_parents p JOIN runs r ON r.run_id = p.run_id "
            "WHERE r.stage = 'analyze' AND r.status = 'succeeded' "
            f"AND p.parent_run_id IN ({marks})",
            inputs,
        ).fetchall()
        chosen.update(r[0] for r in analyses)
        records = [fetch_run(con, run_id) for run_id in sorted(chosen)]
    runs = RunSet(runs=records, requested=seeds, experiment=experiment)
    _choose_primary(runs)
    return runs


def _choose_primary(runs: RunSet) -> None:
    """The rank run a perturb run used (newest), its score run; else the newest of each."""
    by_id = {r.run_id: r for r in runs.runs}
    perturbs = [r for r in runs.runs if r.stage == "perturb"]
    for perturb in reversed(perturbs):
        rank = next((p for p, _ in perturb.parents if by_id.get(p, None) and
                     by_id[p].stage == "rank"), None)
        if rank:
            runs.rank_run = rank
            break
    if runs.rank_run is None and runs.ids("rank"):
        runs.rank_run = runs.ids("rank")[-1]
    if runs.rank_run is not None:
        rank = by_id[runs.rank_run]
        runs.score_run = next(
            (p for p, _ in rank.parents if p in by_id and by_id[p].stage == "score"), None
        )
    if runs.score_run is None and runs.ids("score"):
        runs.score_run = runs.ids("score")[-1]
