"""The ``analyze`` stage: run one registered analyzer over stored runs.

validate -> register -> compute -> write (see :mod:`cwa.analysis.base` for the contract):
inputs are resolved (ids, prefixes, ``latest:STAGE``, or every succeeded run of an input stage
in an experiment) and checked against the analyzer's spec, options are parsed and the
analyzer's own ``validate`` runs, all before the run is registered. The analyze run's parents
are its input runs; its tables are written in one transaction by
:func:`cwa.lifecycle.execute_stage` and its summary metrics mirrored to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput, UsageError
from cwa.lifecycle import RunContext, RunOutcome, StageOutput, StageRequest, execute_stage
from cwa.progress import NULL_REPORTER, Reporter
from cwa.store import Store
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id


@dataclass
class AnalyzeConfig:
    analyzer: str
    runs: list[str] = field(default_factory=list)  # ids, prefixes, latest, latest:STAGE
    input_experiment: str | None = None  # every succeeded input-stage run of this experiment
    options: dict[str, Any] = field(default_factory=dict)  # raw key -> value (strings)
    plugins: list[str] = field(default_factory=list)  # extra module:attr analyzers to register
    experiment: str | None = None  # label of the analyze run (default: the inputs')
    command: str | None = None


def _resolve_inputs(store: Store, spec: Any, config: AnalyzeConfig) -> list[RunRecord]:
    stages = spec.input_stages
    wanted = " or ".join(stages)
    refs = list(config.runs)
    with store.read() as con:
        ids: list[str] = []
        if config.input_experiment is not None:
            marks = ", ".join("?" * len(stages))
            rows = con.execute(
                f"SELECT run_id FROM runs WHERE experiment = ? AND status = 'succeeded' "
                f"AND stage IN ({marks}) ORDER BY run_id",
                [config.input_experiment, *stages],
            ).fetchall()
            if not rows:
                raise InvalidInput(
                    f"experiment {config.input_experiment!r} has no succeeded {wanted} run "
                    f"for analyzer {spec.name}; see `cwa runs list --experiment "
                    f"{config.input_experiment}`"
                )
            ids.extend(str(r[0]) for r in rows)
        if not refs and config.input_experiment is None:
            if spec.min_runs > 1:
                raise UsageError(
                    f"analyzer {spec.name} needs at least {spec.min_runs} {wanted} runs; "
                    "give their ids or --experiment LABEL"
                )
            refs = [f"latest:{stages[0]}"]
        for ref in refs:
            if ref.strip() == "latest":
                ref = f"latest:{stages[0]}"
            run_id = resolve_run_id(con, ref, store_label=store.label)
            ids.append(run_id)
        records = [fetch_run(con, run_id) for run_id in ids]
    seen: set[str] = set()
    for record in records:
        if record.run_id in seen:
            raise InvalidInput(f"run {record.run_id} is given twice; give each input run once")
        seen.add(record.run_id)
        if record.stage not in stages:
            raise InvalidInput(
                f"run {record.run_id} is a {record.stage} run, but analyzer {spec.name} "
                f"takes {wanted} runs"
            )
        if record.status != "succeeded":
            raise InvalidInput(
                f"run {record.run_id} is {record.status}; analyze succeeded runs only"
            )
    return records


def _check_counts(spec: Any, records: list[RunRecord]) -> None:
    n = len(records)
    wanted = " or ".join(spec.input_stages)
    if n < spec.min_runs:
        raise InvalidInput(
            f"analyzer {spec.name} needs at least {spec.min_runs} {wanted} runs, got {n}; "
            "give more run ids (e.g. from `cwa score --seeds 0,1,2`) or --experiment LABEL"
        )
    if spec.max_runs is not None and n > spec.max_runs:
        raise InvalidInput(
            f"analyzer {spec.name} takes at most {spec.max_runs} {wanted} runs, got {n}"
        )
    if spec.same_model and n > 1:
        first = records[0]
        for other in records[1:]:
            key_a = first.model_fingerprint or first.model_ref
            key_b = other.model_fingerprint or other.model_ref
            if key_a != key_b:
                raise InvalidInput(
                    f"runs {first.run_id} ({first.model_ref}) and {other.run_id} "
                    f"({other.model_ref}) are of different models; analyzer {spec.name} "
                    "compares runs of one model"
                )


def prepare_analysis(store: Store, config: AnalyzeConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Everything checked before registering: (spec, inputs, parsed options)."""
    from cwa.analysis import ANALYZERS, get_analyzer
    from cwa.analysis.base import AnalysisInputs

    for plugin in config.plugins:
        ANALYZERS.load_plugin(plugin)
    spec = get_analyzer(config.analyzer)
    options = spec.parse_options(config.options)
    records = _resolve_inputs(store, spec, config)
    _check_counts(spec, records)
    inputs = AnalysisInputs(store, records)
    if spec.validate is not None:
        spec.validate(inputs, options)
    return spec, inputs, options


def _plugin_rows(spec: Any, name: str, rows: Any) -> list[dict[str, Any]]:
    from cwa.analysis.base import rows_as_json

    return [
        {"analyzer": spec.name, "table_name": name, "row_index": i, "data": data}
        for i, data in enumerate(rows_as_json(rows))
    ]


def run_analyze(
    store: Store,
    config: AnalyzeConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> RunOutcome:
    """Run ``config.analyzer`` on its input runs as one ``analyze`` run.

    ``outcome.value`` is the :class:`~cwa.analysis.base.AnalysisResult` (tables to print).
    """
    from cwa.analysis.base import option_to_json
    from cwa.store.runs import result_tables

    reporter = reporter or NULL_REPORTER
    spec, inputs, options = prepare_analysis(store, config)
    records = inputs.runs
    models = {r.model_ref for r in records}
    experiments = {r.experiment for r in records}
    run_config = {
        "analyzer": spec.name,
        "analyzer_version": spec.version,
        "inputs": [r.run_id for r in records],
        "input_experiment": config.input_experiment,
        "options": {k: option_to_json(v) for k, v in options.items()},
    }
    request = StageRequest(
        stage="analyze",
        config=run_config,
        experiment=config.experiment
        or config.input_experiment
        or (experiments.pop() if len(experiments) == 1 else "default"),
        parents=[(r.run_id, "input") for r in records],
        model_ref=models.pop() if len(models) == 1 else None,
        command=config.command,
    )
    with store.read() as con:
        schema_tables = set(result_tables(con))

    def compute(ctx: RunContext) -> StageOutput:
        result = spec.run(inputs, options, ctx.reporter)
        fingerprints = {r.model_fingerprint for r in records}
        ctx.set_model(
            request.model_ref, fingerprints.pop() if len(fingerprints) == 1 else None, "cpu"
        )
        if result.effective:
            ctx.record_config(effective=result.effective)
        tables: dict[str, Any] = {}
        plugin_rows: list[dict[str, Any]] = []
        for name, rows in result.tables.items():
            if name not in spec.tables:
                raise InvalidInput(
                    f"analyzer {spec.name} returned table {name!r} it does not declare "
                    f"(declared: {', '.join(spec.tables) or 'none'})"
                )
            if name in schema_tables:
                tables[name] = rows
            else:
                plugin_rows.extend(_plugin_rows(spec, name, rows))
        if plugin_rows:
            tables["analysis_rows"] = plugin_rows
        return StageOutput(tables=tables, metrics=dict(result.metrics), value=result)

    return execute_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
