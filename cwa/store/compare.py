"""Side-by-side comparison of runs (``cwa runs compare``): provenance, config and metrics.

Config is flattened to dotted keys (``data.seq_len``); a row differs when the runs do not all
hold the same value (a key missing from one run counts as different).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cwa.errors import InvalidInput
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id
from cwa.store.store import Store

_MISSING = object()


@dataclass
class ComparisonRow:
    section: str  # run, config, metric, tag
    key: str
    values: list[Any]  # one per run (None where absent)
    differs: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "key": self.key,
            "values": self.values,
            "differs": self.differs,
        }


@dataclass
class Comparison:
    run_ids: list[str]
    rows: list[ComparisonRow]

    def to_dict(self) -> dict[str, Any]:
        return {"run_ids": self.run_ids, "rows": [r.to_dict() for r in self.rows]}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _rows(section: str, per_run: list[dict[str, Any]]) -> list[ComparisonRow]:
    keys = sorted({k for d in per_run for k in d})
    rows = []
    for key in keys:
        raw = [d.get(key, _MISSING) for d in per_run]
        first = raw[0]
        differs = any(v is _MISSING for v in raw) or any(v != first for v in raw[1:])
        rows.append(
            ComparisonRow(section, key, [None if v is _MISSING else v for v in raw], differs)
        )
    return rows


def _provenance(run: RunRecord) -> dict[str, Any]:
    return {
        "stage": run.stage,
        "status": run.status,
        "experiment": run.experiment,
        "model": run.model_ref,
        "model_fingerprint": run.model_fingerprint,
        "seed": run.seed,
        "parents": ",".join(p for p, _ in run.parents),
        "cwa_version": run.cwa_version,
        "git_sha": run.git_sha,
        "device": run.device,
        "duration_s": run.duration_s,
    }


def compare_runs(store: Store, refs: list[str]) -> Comparison:
    """Resolve every reference, then line up provenance, config, metrics and tags."""
    if len(refs) < 2:
        raise InvalidInput("cwa runs compare needs at least two runs")
    from cwa.store.tags import tags_of

    with store.read() as con:
        ids = [resolve_run_id(con, r, store_label=store.label) for r in refs]
        if len(set(ids)) < len(ids):
            raise InvalidInput(
                f"the same run is given twice ({', '.join(refs)}); pass distinct runs"
            )
        runs = [fetch_run(con, rid) for rid in ids]
        metrics = [
            dict(
                con.execute(
                    "SELECT name, value FROM run_metrics WHERE run_id = ?", [rid]
                ).fetchall()
            )
            for rid in ids
        ]
        tags = [tags_of(con, rid) for rid in ids]
    rows = _rows("run", [_provenance(r) for r in runs])
    rows += _rows("config", [flatten(r.config) for r in runs])
    rows += _rows("metric", metrics)
    rows += _rows("tag", tags)
    return Comparison(ids, rows)
