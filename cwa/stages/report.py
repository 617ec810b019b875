"""The ``report`` stage: figures and a self-contained HTML page drawn from stored results.

It reads only the store (tables written by score, rank, evaluate, perturb and analyze) and never
recomputes a metric. The runs shown become the report run's parents; the page (kind ``report``)
and one file per figure and format (kind ``plot``) are the run's artifacts, mirrored to MLflow
with the run. ``--out`` additionally copies ``report.html`` and ``plots/`` to a directory.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunContext, RunOutcome, StageOutput, StageRequest, execute_stage
from cwa.progress import NULL_REPORTER, Reporter
from cwa.reporting.style import FORMATS
from cwa.store import Store

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)  # ids, prefixes, latest, latest:STAGE
    experiment: str | None = None  # cover every succeeded run of this experiment
    out: str | None = None  # also copy report.html and plots/ here
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    title: str | None = None
    command: str | None = None


def parse_formats(text: str | list[str] | None) -> list[str]:
    """'png,pdf' -> ['png', 'pdf'], refusing unknown formats with the list of known ones."""
    if text is None:
        return list(FORMATS)
    items = text if isinstance(text, list) else text.split(",")
    formats = [f.strip().lower().lstrip(".") for f in items if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InvalidInput(
            f"unknown figure format {unknown[0]!r}; use a comma-separated list of "
            f"{', '.join(FORMATS)}"
        )
    if not formats:
        raise InvalidInput(f"--formats is empty; give one or more of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def check_out_dir(out: str | None) -> Path | None:
    """Create ``out`` if needed and prove it is writable (before any run is registered)."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"--out {path} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cwa-write-check-"):
            pass
    except OSError as exc:
        raise InvalidInput(
            f"--out {path} is not writable ({exc.strerror or exc}); choose another directory"
        ) from exc
    return path


def run_report(
    store: Store,
    config: ReportConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> RunOutcome:
    """Validate, resolve the runs to show, register the report run, draw and write."""
    from cwa.reporting.runset import resolve_runs

    reporter = reporter or NULL_REPORTER
    config.formats = parse_formats(config.formats)
    out_dir = check_out_dir(config.out)
    runs = resolve_runs(store, config.runs, config.experiment)
    experiments = {r.experiment for r in runs.runs}
    label = config.experiment or (experiments.pop() if len(experiments) == 1 else "default")
    models = {(r.model_ref, r.model_fingerprint) for r in runs.runs if r.model_fingerprint}
    request = StageRequest(
        stage="report",
        config={**asdict(config), "shown_runs": [r.run_id for r in runs.runs]},
        experiment=label,
        parents=[(r.run_id, r.stage) for r in runs.runs],
        model_ref=next(iter(models))[0] if len(models) == 1 else None,
        command=config.command,
    )

    def compute(ctx: RunContext) -> StageOutput:
        from cwa.reporting.build import collect, draw_all
        from cwa.reporting.render import render_html
        from cwa.reporting.summary import findings

        if len(models) == 1:
            ctx.set_model(*next(iter(models)), None)
        reporter.info(f"report: {len(runs.runs)} run(s); querying the store")
        collected = collect(store, runs)
        found = findings(store, runs)
        reporter.info("report: drawing figures")
        plots = ctx.artifacts_dir / PLOTS_DIR
        drawn = draw_all(collected, plots, config.formats)
        for figure in drawn:
            for path in figure.files.values():
                ctx.artifact_path(path.relative_to(ctx.artifacts_dir).as_posix(), "plot")
            if figure.data.frame is not None:
                name = f"{PLOTS_DIR}/{figure.data.spec.name}.csv"
                figure.data.frame.write_csv(ctx.artifact_path(name, "table"))
        html = render_html(
            runs=runs,
            figures=drawn,
            findings=found,
            store_label=str(store.path.resolve()),
            report_run=ctx.run_id,
            title=config.title,
        )
        report_path = ctx.artifact_path(REPORT_FILE, "report")
        report_path.write_text(html, encoding="utf-8")
        copied = _copy_out(ctx.artifacts_dir, out_dir) if out_dir is not None else None
        available = [f.data.spec.name for f in drawn if f.available]
        missing = {f.data.spec.name: f.data.missing for f in drawn if not f.available}
        return StageOutput(
            metrics={
                "figures_drawn": float(len(available)),
                "figures_missing": float(len(missing)),
                "runs_shown": float(len(runs.runs)),
            },
            value={
                "report": report_path,
                "out_report": copied,
                "figures": available,
                "missing": missing,
                "findings": [f.text for f in found],
                "runs": [r.run_id for r in runs.runs],
            },
        )

    return execute_stage(store, request, compute, reporter=reporter, mlflow=mlflow)


def _copy_out(artifacts: Path, out_dir: Path) -> Path:
    target_plots = out_dir / PLOTS_DIR
    target_plots.mkdir(parents=True, exist_ok=True)
    for path in (artifacts / PLOTS_DIR).glob("*"):
        if path.is_file():
            shutil.copy2(path, target_plots / path.name)
    shutil.copy2(artifacts / REPORT_FILE, out_dir / REPORT_FILE)
    return out_dir / REPORT_FILE


def report_summary(outcome: RunOutcome) -> dict[str, Any]:
    value = outcome.value or {}
    return {
        "run_id": outcome.run_id,
        "report": str(value.get("report")),
        "out_report": None if value.get("out_report") is None else str(value["out_report"]),
        "figures": value.get("figures", []),
        "missing": value.get("missing", {}),
        "findings": value.get("findings", []),
        "runs": value.get("runs", []),
        "mlflow_run_id": outcome.mlflow_run_id,
    }
