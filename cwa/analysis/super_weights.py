"""The ``super_weights`` analyzer (alias ``super-weights``): are the candidates real?

Input: one ``super_weight`` score run. Without ``verify`` it reads only the store: the per-layer
activation profile of the MLP down projections and the candidates. With ``-o verify=true`` it
loads the scored model (fingerprint checked), measures perplexity unmodified, with each candidate
alone zeroed, and with ``seeds`` random weights of the same tensor zeroed one at a time, each
restored bit-exactly before the next; the verdict rule is in
:mod:`cwa.analysis.superweight_verify`. Perplexity is measured on the score run's held-out text
(the tail of its calibration source that calibration never used; the toy held-out text for the
toy model) or on ``-o data=FILE|hf:...`` with ``-o limit=N`` windows.

Tables (migration 0008): ``analysis_super_weight_profile``, ``analysis_super_weights`` and, with
verification, ``analysis_super_weight_controls``; the view ``verified_super_weights``.
"""

from __future__ import annotations

from typing import Any

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable
from cwa.errors import InvalidInput

NAME = "super_weights"
DESCRIPTION = "super-weight activation profile and candidates; --verify ablates each candidate"


def _metric(run: Any) -> str | None:
    config = run.config or {}
    return config.get("metric") or (config.get("metric_config") or {}).get("metric")


def _candidates(inputs: Any, run: Any) -> Any:
    return inputs.query(
        "SELECT * FROM super_weights WHERE run_id = ? ORDER BY layer, rowid", [run.run_id]
    )


def _activation_profile(inputs: Any, run: Any) -> Any:
    exists = inputs.query(
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?",
        ["activation_profile"],
    )["n"][0]
    if not exists:
        return None
    return inputs.query(
        "SELECT * FROM activation_profile WHERE run_id = ? ORDER BY round, layer", [run.run_id]
    )


def _task_spec(run: Any, options: dict[str, Any]) -> str:
    """The perplexity task spec: ``-o data`` or the score run's calibration source."""
    if options["data"]:
        return f"perplexity:{options['data']}"
    source = ((run.config or {}).get("data") or {}).get("source")
    if not source:
        raise InvalidInput(
            f"score run {run.run_id} records no calibration source; pass -o data=FILE for the "
            "perplexity text"
        )
    return f"perplexity:{source}"


def _plans(inputs: Any, run: Any, options: dict[str, Any]) -> Any:
    """The perplexity plan; when the text is the run's calibration text, only its held-out
    tail is scored (the run's calibration record tells which part calibration used)."""
    from cwa.evaluation.tasks import plan_tasks
    from cwa.stages.common import calibration_records, is_toy_ref

    return plan_tasks(
        _task_spec(run, options),
        limit=options["limit"],
        seed=0,
        seq_len=options["seq_len"],
        is_toy_model=is_toy_ref(run.model_ref),
        calibration=calibration_records(inputs.store, [run.run_id]),
    )


def _validate(inputs: Any, options: dict[str, Any]) -> None:
    (run,) = inputs.runs
    metric = _metric(run)
    if metric != "super_weight":
        raise InvalidInput(
            f"score run {run.run_id} used metric {metric!r}; the super_weights analyzer needs a "
            "run of `cwa score --metric super_weight`"
        )
    n_candidates = _candidates(inputs, run).height
    profile = _activation_profile(inputs, run)
    if n_candidates == 0 and (profile is None or profile.height == 0):
        raise InvalidInput(
            f"score run {run.run_id} stored neither super-weight candidates nor an activation "
            "profile; re-run `cwa score --metric super_weight`"
        )
    if options["verify"] and n_candidates == 0:
        raise InvalidInput(
            f"score run {run.run_id} found no super-weight candidate to verify (no down "
            "projection's spikes reached its spike_threshold); see its activation profile "
            "without -o verify=true"
        )
    if options["verify"]:
        _plans(inputs, run, options)  # a missing data file fails here, before registering
        from cwa.models.loading import resolve_device

        resolve_device(options["device"])


def _flat_index(arch: Any, row: dict[str, Any]) -> int:
    shape = arch.params[row["parameter"]].shape
    return int(row["row_index"]) * int(shape[1]) + int(row["column_index"])


def _verify(inputs: Any, run: Any, rows: list[dict[str, Any]], options: dict[str, Any],
            reporter: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:  # fmt: skip
    from cwa.analysis.superweight_verify import rule_text, verify_candidates
    from cwa.evaluation.runner import evaluate_model
    from cwa.stages.rank import load_source_model

    loaded = load_source_model(inputs.store, run, device=options["device"], reporter=reporter)
    plans = _plans(inputs, run, options)

    def perplexity() -> float:
        results = evaluate_model(
            loaded.model, loaded.tokenizer, plans, batch_size=options["batch_size"]
        )
        return next(float(r["value"]) for r in results if r["metric"] == "perplexity")

    _, verdicts, controls = verify_candidates(
        loaded.model,
        rows,
        perplexity,
        seeds=list(range(options["seeds"])),
        min_ratio=options["min_ratio"],
        min_z=options["min_z"],
        reporter=reporter,
    )
    rule = rule_text(options["min_ratio"], options["min_z"])
    verdicts = [{**v, "verified": True, "task": "perplexity", "rule": rule} for v in verdicts]
    (plan,) = plans
    used = {"task_config": plan.config, "task_config_hash": plan.config_hash,
            "scored": plan.options.get("note") or "the whole text"}  # fmt: skip
    return verdicts, controls, used


def _run(inputs: Any, options: dict[str, Any], reporter: Any) -> AnalysisResult:
    import polars as pl

    from cwa.analysis.superweight_verify import profile_rows

    (run,) = inputs.runs
    candidates = _candidates(inputs, run)
    profile = profile_rows(_activation_profile(inputs, run), candidates).with_columns(
        pl.lit(run.run_id).alias("score_run_id")
    )
    arch = inputs.architecture(run)
    keep = ["layer", "parameter", "row_index", "column_index", "input_channel", "output_channel",
            "input_activation", "output_activation", "weight_value"]  # fmt: skip
    rows = [
        {**{k: r.get(k) for k in keep}, "round": r.get("round"), "flat_index": _flat_index(arch, r)}
        for r in candidates.iter_rows(named=True)
    ]
    controls: list[dict[str, Any]] = []
    effective: dict[str, Any] = {}
    if options["verify"]:
        rows, controls, effective["perplexity"] = _verify(inputs, run, rows, options, reporter)
    else:
        rows = [{**r, "verified": False} for r in rows]
    # No candidates (no projection reached the spike threshold): the profile alone.
    table = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        pl.lit(run.run_id).alias("score_run_id")
    )
    metrics = {"n_candidates": float(len(rows)), "n_layers": float(profile.height)}
    columns = ["layer", "parameter", "row_index", "column_index", "weight_value"]
    if options["verify"]:
        metrics["n_super_weights"] = float(table["is_super_weight"].sum())
        metrics["baseline_perplexity"] = float(table["baseline"][0])
        metrics["max_ratio"] = float(table["ratio"].max())
        columns += ["zeroed", "ratio", "control_mean", "z_score", "is_super_weight"]
    display = [
        DisplayTable(
            f"super-weight candidates of {run.run_id}"
            + (f" (baseline perplexity {metrics['baseline_perplexity']:.4g})"
               if options["verify"] else ""),
            columns,
            [tuple(r[c] for c in columns) for r in table.iter_rows(named=True)],
        ),
        DisplayTable(
            "down-projection activation profile",
            ("layer", "max |input|", "channel", "max |output|", "channel", "x median layer"),
            [(r["layer"], r["max_input_abs"], r["input_channel"], r["max_output_abs"],
              r["output_channel"], r["layer_output_ratio"]) for r in profile.iter_rows(named=True)],
        ),
    ]  # fmt: skip
    tables: dict[str, Any] = {"analysis_super_weight_profile": profile}
    if rows:
        tables["analysis_super_weights"] = table
    if controls:
        tables["analysis_super_weight_controls"] = pl.DataFrame(controls)
    return AnalysisResult(tables=tables, metrics=metrics, display=display, effective=effective)


ANALYZER = AnalyzerSpec(
    name=NAME,
    version="1",
    description=DESCRIPTION,
    input_stages=("score",),
    run=_run,
    min_runs=1,
    max_runs=1,
    options=(
        AnalyzerOption("verify", "bool", False, "zero each candidate and random controls"),
        AnalyzerOption("seeds", "int", 5, "random control weights per candidate", minimum=2),
        AnalyzerOption(
            "min_ratio", "float", 1.5, "perplexity ratio a super weight reaches", minimum=1.0
        ),
        AnalyzerOption(
            "min_z", "float", 3.0, "control standard deviations above the controls", minimum=0.0
        ),
        AnalyzerOption("data", "str", None, "perplexity text (default: the run's held-out text)"),
        AnalyzerOption("limit", "int", None, "perplexity windows (seeded subset)", minimum=1),
        AnalyzerOption("seq_len", "int", None, "perplexity window length", minimum=2),
        AnalyzerOption("batch_size", "int", 16, "evaluation batch size", minimum=1),
        AnalyzerOption("device", "str", "cpu", "device for --verify (cpu, cuda, auto)"),
    ),  # fmt: skip
    tables=(
        "analysis_super_weight_profile",
        "analysis_super_weights",
        "analysis_super_weight_controls",
    ),
    validate=_validate,
)
