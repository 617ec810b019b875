"""The ``rank`` stage: the top-k (or bottom-k) weights of a score run, per ranking mode.

Rows go to ``ranked_weights`` (one group ``all`` for global mode, one group per layer, tensor,
head or component otherwise). The model the scores were computed on is reloaded to read the
architecture map and the weight values, and its fingerprint must match the score run's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunContext, RunOutcome, StageOutput, StageRequest, execute_stage
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import check_positive
from cwa.stages.score import SCORE_FILE
from cwa.store import Store
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id


@dataclass
class RankConfig:
    score_run: str = "latest:score"
    topk: int = 100
    mode: str = "global"
    bottom: bool = False
    layers: list[int] | None = None
    components: list[str] | None = None
    export: str | None = None  # .csv or .parquet path for the ranked rows
    device: str = "cpu"
    experiment: str | None = None  # default: the score run's experiment
    command: str | None = None


def load_source_model(
    store: Store, run: RunRecord, *, device: str, reporter: Reporter, loaded: Any = None
) -> Any:
    """Reload the model a run used (or take ``loaded``) and check it has the same weights."""
    from cwa.models.loading import load_model

    if loaded is not None:
        if run.model_fingerprint and loaded.fingerprint != run.model_fingerprint:
            raise InvalidInput(
                f"the model given is not the one run {run.run_id} used (fingerprint "
                f"{loaded.fingerprint[:12]} vs {run.model_fingerprint[:12]})"
            )
        return loaded

    model_cfg = run.config.get("model", {})
    loaded = load_model(
        run.model_ref or model_cfg.get("ref"),
        dtype=model_cfg.get("dtype", "auto"),
        device=device,
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        reporter=reporter,
    )
    if run.model_fingerprint and loaded.fingerprint != run.model_fingerprint:
        raise InvalidInput(
            f"model {run.model_ref!r} has changed since run {run.run_id} used it (fingerprint "
            f"{loaded.fingerprint[:12]} now, {run.model_fingerprint[:12]} then); re-run the "
            "score stage on the current weights"
        )
    return loaded


def export_rows(frame: Any, path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        raise InvalidInput(f"--export {path!r}: use a .csv or .parquet file name")


def run_rank(
    store: Store,
    config: RankConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> RunOutcome:
    from cwa.ranking import RANK_MODES

    reporter = reporter or NULL_REPORTER
    check_positive("topk", config.topk)
    if config.mode not in RANK_MODES:
        raise InvalidInput(
            f"unknown ranking mode {config.mode!r}; use one of {', '.join(RANK_MODES)}"
        )
    if config.export:
        suffix = Path(config.export).suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise InvalidInput(f"--export {config.export!r}: use a .csv or .parquet file name")
        if not Path(config.export).resolve().parent.is_dir():
            raise InvalidInput(
                f"--export {config.export}: folder {Path(config.export).parent} does not exist"
            )
    if config.components:
        from cwa.models.architecture import resolve_components

        resolve_components(config.components)  # unknown names fail before a run is registered
    with store.read() as con:
        score_id = resolve_run_id(con, config.score_run, stage="score", store_label=store.label)
        score_run = fetch_run(con, score_id)
    if score_run.status != "succeeded":
        raise InvalidInput(f"score run {score_id} is {score_run.status}; rank a succeeded run")
    score_path = store.artifacts_dir(score_id) / SCORE_FILE
    if not score_path.is_file():
        raise InvalidInput(
            f"score run {score_id} has no {SCORE_FILE} in {score_path.parent}; "
            "its artifacts were removed: re-run the score stage"
        )
    run_config = asdict(config)
    run_config["score_run"] = score_id
    run_config.pop("command")
    request = StageRequest(
        stage="rank",
        config=run_config,
        experiment=config.experiment or score_run.experiment,
        parents=[(score_id, "scores")],
        model_ref=score_run.model_ref,
        seed=score_run.seed,
        command=config.command,
    )

    def compute(ctx: RunContext) -> StageOutput:
        from cwa.ranking import rank_scores, ranking_frame

        loaded_model = load_source_model(
            store, score_run, device=config.device, reporter=ctx.reporter, loaded=loaded
        )
        ctx.set_model(score_run.model_ref, loaded_model.fingerprint, loaded_model.device)
        rows = rank_scores(
            score_path,
            loaded_model.arch,
            k=config.topk,
            mode=config.mode,
            bottom=config.bottom,
            layers=config.layers,
            components=config.components,
            weights=dict(loaded_model.model.named_parameters()),
        )
        frame = ranking_frame(rows).rename(
            {"row": "row_index", "column": "column_index", "group": "group_key"}
        )
        if config.export:
            export_rows(frame.drop([]), config.export)
        scores = frame["score"]
        metrics = {
            "n_ranked": float(frame.height),
            "n_groups": float(frame["group_key"].n_unique()),
        }
        if frame.height:
            metrics.update({"score_max": float(scores.max()), "score_min": float(scores.min())})
        return StageOutput(tables={"ranked_weights": frame}, metrics=metrics, value=frame)

    return execute_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
