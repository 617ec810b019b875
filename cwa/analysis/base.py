"""The analyzer contract: what every ``cwa analyze`` analyzer declares, receives and returns.

An analyzer is an :class:`AnalyzerSpec` registered in :data:`cwa.analysis.ANALYZERS`. The
stage (:mod:`cwa.stages.analyze`) does everything around it, in this order:

1. **Resolve inputs** (run ids, prefixes, ``latest:STAGE``, or every succeeded run of an input
   stage in ``--experiment LABEL``) and check them against the spec: each run's stage is in
   ``input_stages``, ``min_runs <= len(runs) <= max_runs``, one model when ``same_model``
   (same model fingerprint), no run twice, every run ``succeeded``.
2. **Parse options**: ``--option key=value`` strings (and the common flags the CLI maps onto
   option names, e.g. ``--k-values`` -> ``k_values``, ``--p`` -> ``p``) are checked against
   ``options`` (unknown keys get a did-you-mean) and converted by :meth:`AnalyzerOption.parse`.
3. **Validate**: ``spec.validate(inputs, options)`` (optional) raises :class:`InvalidInput`
   for anything that depends on the inputs (k larger than the number of scored weights, a
   rank run that is not a child of the score run, ...). It may read score-file headers and
   store tables, never whole score files. Nothing is registered before this returns.
4. **Register** the ``analyze`` run (parents = the input runs, role ``input``), then call
   ``spec.run(inputs, options, reporter)`` with no store connection held.
5. **Write** the returned :class:`AnalysisResult` in ONE transaction: every table in
   ``result.tables`` (a polars DataFrame or a list of row dicts; ``run_id`` is added) and
   ``result.metrics`` (to ``run_metrics``, mirrored to MLflow). A table name must be one of
   ``spec.tables``; built-in analyzers declare typed tables created by a migration
   (``migrations/0007_analysis.sql``, ``0008_analysis_more.sql``). A plugin may return a
   table that does not exist in the schema: its rows are stored as JSON in ``analysis_rows``
   (run_id, analyzer, table_name, row_index, data).
6. ``result.effective`` (settings found while computing, e.g. the rank run profile used) is
   added to the run config under ``effective``. The CLI prints ``result.display`` (a few
   :class:`DisplayTable` s) and the run id; ``--json`` gives them as lists of row objects.

What :class:`AnalysisInputs` gives an analyzer:

- ``inputs.runs``: the input :class:`~cwa.store.runs.RunRecord` s, in the order given;
- ``inputs.score_path(run)``: ``artifacts/<run_id>/scores.safetensors`` of a score run;
  ``inputs.open_scores(run)``: a context manager yielding a
  :class:`~cwa.scorefile.ScoreFileReader` (``names()``, ``shape(name)``, ``get(name)`` loads ONE
  tensor). Read score files tensor by tensor, never all at once;
- ``inputs.score_header(run)``: {parameter: shape} from the file header, without torch;
- ``inputs.query(sql, params)``: a polars DataFrame from a short read-only connection (tables:
  ``tensor_stats``, ``ranked_weights``, ``evaluations``, ``perturbation_conditions``, ...);
- ``inputs.tensor_stats(run)``: that run's ``tensor_stats`` rows (layer, component per tensor);
- ``inputs.architecture(run)``: the :class:`~cwa.models.architecture.ArchitectureMap` of the
  run's model, built from its config alone on the ``meta`` device (no weights are read;
  cached per model). Gives layer, component(s), head ids (GQA: k/v carry kv-head ids),
  ``n_heads``, ``n_kv_heads``, ``group_size``;
- ``inputs.child_runs(run, stage)``: succeeded runs whose parent is ``run`` (e.g. the rank
  runs of a score run).

An analyzer never prints, never computes gradients, and never holds every score of a large
model in memory. Version bumps (``version``) when its output changes meaning; it is stored in
the run config as ``analyzer_version``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    from cwa.progress import Reporter
    from cwa.scorefile import ScoreFileReader
    from cwa.store import Store
    from cwa.store.runs import RunRecord

SCORE_FILE = "scores.safetensors"  # same name as cwa.stages.score.SCORE_FILE (no torch import)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# -- options --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KValue:
    """One entry of a k list: an absolute count, or a fraction of the group's weights."""

    count: int | None = None
    fraction: float | None = None

    @property
    def label(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.fraction * 100:g}%"  # type: ignore[operator]

    def resolve(self, n: int) -> int:
        """The k this entry means for a group of ``n`` weights (at least 1)."""
        if self.count is not None:
            return self.count
        return max(1, round(self.fraction * n))  # type: ignore[operator]


def parse_k_values(text: str) -> list[KValue]:
    """'100,1000,0.1%' -> [KValue(100), KValue(1000), KValue(fraction=0.001)]."""
    values: list[KValue] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if part.endswith("%"):
                fraction = float(part[:-1]) / 100.0
                if not 0 < fraction <= 1:
                    raise ValueError
                value = KValue(fraction=fraction)
            else:
                count = int(part)
                if count < 1:
                    raise ValueError
                value = KValue(count=count)
        except ValueError:
            raise InvalidInput(
                f"cannot read k value {part!r}; use positive integers or percentages like "
                "'100,1000,0.1%'"
            ) from None
        if value not in values:
            values.append(value)
    if not values:
        raise InvalidInput("the k list is empty; give e.g. '100,1000,0.1%'")
    return values


@dataclass(frozen=True)
class AnalyzerOption:
    """One typed option of an analyzer (``--option name=value``).

    ``kind``: ``int``, ``float``, ``str``, ``bool``, ``k_list`` (see :func:`parse_k_values`),
    ``run`` (a run reference, resolved by the analyzer's ``validate``), or ``str_list``.
    ``minimum``/``maximum`` bound numbers (inclusive); ``choices`` bounds strings.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: Any) -> Any:
        """Convert a raw value (usually a string from the command line) to the option's type."""
        if raw is None:
            return None
        text = str(raw).strip()
        where = f"option {self.name}={text!r}"
        try:
            if self.kind == "int":
                value: Any = int(text) if not isinstance(raw, int) else raw
            elif self.kind == "float":
                value = float(text) if not isinstance(raw, float) else raw
            elif self.kind == "bool":
                if isinstance(raw, bool):
                    value = raw
                elif text.lower() in _TRUE:
                    value = True
                elif text.lower() in _FALSE:
                    value = False
                else:
                    raise ValueError
            elif self.kind == "k_list":
                return raw if isinstance(raw, list) else parse_k_values(text)
            elif self.kind == "str_list":
                if isinstance(raw, list):
                    return raw
                return [p.strip() for p in text.split(",") if p.strip()]
            else:
                value = text
        except ValueError:
            raise InvalidInput(f"{where}: expected a {self.kind}") from None
        if self.choices is not None and value not in self.choices:
            raise InvalidInput(f"{where}: use one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidInput(f"{where}: must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidInput(f"{where}: must be at most {self.maximum:g}")
        return value

    def default_value(self) -> Any:
        return self.parse(self.default) if isinstance(self.default, str) else self.default


def option_to_json(value: Any) -> Any:
    """An option value as stored in the run config."""
    if isinstance(value, list):
        return [option_to_json(v) for v in value]
    if isinstance(value, KValue):
        return value.label
    return value


# -- results --------------------------------------------------------------------------------
@dataclass
class DisplayTable:
    """A small table for the terminal (the CLI renders it with Rich)."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]]


@dataclass
class AnalysisResult:
    """What an analyzer returns: rows per output table, summary metrics, tables to print."""

    tables: dict[str, Any] = field(default_factory=dict)  # name -> polars frame or row dicts
    metrics: dict[str, float] = field(default_factory=dict)
    display: list[DisplayTable] = field(default_factory=list)
    effective: dict[str, Any] = field(default_factory=dict)  # settings found while computing


# -- inputs ---------------------------------------------------------------------------------
class AnalysisInputs:
    """Read access to the input runs of one analysis (see the module docstring)."""

    def __init__(self, store: Store, runs: Sequence[RunRecord]) -> None:
        self.store = store
        self.runs = list(runs)
        self._arch: dict[str, Any] = {}

    def score_path(self, run: RunRecord) -> Path:
        return self.store.artifacts_dir(run.run_id) / SCORE_FILE

    @contextmanager
    def open_scores(self, run: RunRecord) -> Iterator[ScoreFileReader]:
        from cwa.scorefile import open_scores

        with open_scores(self.score_path(run)) as reader:
            yield reader

    def score_header(self, run: RunRecord) -> dict[str, tuple[int, ...]]:
        from cwa.scorefile import read_score_header

        header, _ = read_score_header(self.score_path(run))
        return {name: tuple(info["shape"]) for name, info in header.items()}

    def query(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Rows of a read-only query as a polars DataFrame."""
        import polars as pl

        with self.store.read() as con:
            cursor = con.execute(sql, list(params))
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        return pl.DataFrame(rows, schema=columns, orient="row", infer_schema_length=None)

    def tensor_stats(self, run: RunRecord) -> Any:
        return self.query(
            "SELECT * FROM tensor_stats WHERE run_id = ? ORDER BY rowid", [run.run_id]
        )

    def child_runs(self, run: RunRecord, stage: str) -> list[str]:
        """Succeeded runs of ``stage`` whose parent is ``run``, newest first."""
        with self.store.read() as con:
            rows = con.execute(
                "SELECT r.run_id FROM runs r JOIN run_parents p ON p.run_id = r.run_id "
                "WHERE p.parent_run_id = ? AND r.stage = ? AND r.status = 'succeeded' "
                "ORDER BY r.run_id DESC",
                [run.run_id, stage],
            ).fetchall()
        return [str(r[0]) for r in rows]

    def architecture(self, run: RunRecord) -> Any:
        """The run's ArchitectureMap from its model config (meta device: no weights read)."""
        from cwa.analysis.archmap import architecture_for_run

        key = run.model_fingerprint or run.model_ref or run.run_id
        if key not in self._arch:
            self._arch[key] = architecture_for_run(run)
        return self._arch[key]


# -- the spec -------------------------------------------------------------------------------
RunFunction = Callable[[AnalysisInputs, dict[str, Any], "Reporter"], AnalysisResult]
ValidateFunction = Callable[[AnalysisInputs, dict[str, Any]], None]


@dataclass(frozen=True)
class AnalyzerSpec:
    """One analyzer (see the module docstring for how the stage uses each field)."""

    name: str
    version: str
    description: str  # one line, shown by ``cwa analyze --list``
    input_stages: tuple[str, ...]
    run: RunFunction
    min_runs: int = 1
    max_runs: int | None = None  # None: no upper bound
    same_model: bool = True
    options: tuple[AnalyzerOption, ...] = ()
    tables: tuple[str, ...] = ()
    validate: ValidateFunction | None = None

    def option(self, name: str) -> AnalyzerOption:
        for opt in self.options:
            if opt.name == name:
                return opt
        names = [o.name for o in self.options]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(names) or "none"
        raise InvalidInput(f"analyzer {self.name} has no option {name!r}{hint} (options: {known})")

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Every option with its default, overridden by the (checked, converted) raw values."""
        parsed = {opt.name: opt.default_value() for opt in self.options}
        for name, value in raw.items():
            parsed[name] = self.option(name).parse(value)
        return parsed

    def runs_text(self) -> str:
        if self.max_runs == self.min_runs:
            return str(self.min_runs)
        if self.max_runs is None:
            return f"{self.min_runs}+"
        return f"{self.min_runs}-{self.max_runs}"


def parse_option_pairs(pairs: Sequence[str] | None) -> dict[str, str]:
    """['k=100', 'p=0.9'] -> {'k': '100', 'p': '0.9'}; a pair without '=' is an error."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--option {pair!r}: write it as key=value")
        out[name.strip().replace("-", "_")] = value.strip()
    return out


def as_analyzer_spec(obj: Any, name: str) -> AnalyzerSpec:
    """A registry entry as an AnalyzerSpec (plugins must provide one)."""
    if isinstance(obj, AnalyzerSpec):
        return obj
    raise InvalidInput(
        f"analyzer plugin {name!r} is a {type(obj).__name__}, not a "
        "cwa.analysis.base.AnalyzerSpec; see the contract in cwa/analysis/base.py"
    )


def rows_as_json(rows: Any) -> list[str]:
    """Rows of a frame or a list of dicts as JSON strings (for ``analysis_rows``)."""
    if hasattr(rows, "to_dicts"):
        rows = rows.to_dicts()
    return [json.dumps(row, sort_keys=True, default=str) for row in rows]
