"""The ``score`` stage: per-weight sensitivity scores, one run per seed.

Each run stores the full score tensors as ``scores.safetensors`` in its artifacts folder
(written tensor by tensor), per-tensor statistics in ``tensor_stats``, super-weight candidates
in ``super_weights`` (for that metric), and the calibration loss and token count as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunContext, RunOutcome, StageOutput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import ModelOptions, check_positive
from cwa.stages.setup import stage_request
from cwa.store import Store

SCORE_FILE = "scores.safetensors"
# Metrics whose second-order backward pass needs eager attention.
_DOUBLE_BACKWARD = {"hutchinson_diag", "obd"}


@dataclass
class DataOptions:
    # None: the toy text for the toy models, WikiText-2 raw train for every other model.
    source: str | None = None
    text_column: str | None = None
    n_samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    heldout_fraction: float = 0.1  # tail of the text never used for calibration
    add_bos_token: bool | None = None  # None: follow the tokenizer's convention
    source_defaulted: bool = False  # set when source was None and resolved for the model


@dataclass
class ScoreConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    metric: str = "grad_x_weight"
    data: DataOptions = field(default_factory=DataOptions)
    seeds: list[int] = field(default_factory=lambda: [0])
    layers: list[int] | None = None
    components: list[str] | None = None
    probes: int | None = None
    score_dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)
    experiment: str = "default"
    command: str | None = None
    # Recompute decoder-block activations during backward (gradient / Hessian metrics).
    activation_checkpointing: bool = False


def calibration_texts(data: DataOptions, model_ref: str | None = None) -> list[str]:
    """The calibration documents (checked before any run is registered).

    Resolves a missing ``data.source`` for ``model_ref`` in place (toy text only for the toy
    models, WikiText-2 otherwise) and remembers whether it was defaulted.
    """
    from cwa.data.calibration import load_calibration_texts

    source, defaulted, texts = load_calibration_texts(
        data.source, model_ref, text_column=data.text_column
    )
    data.source = source
    data.source_defaulted = data.source_defaulted or defaulted
    return texts


def calibration_batches(
    loaded: Any, data: DataOptions, seed: int, texts: list[str]
) -> list[dict[str, Any]]:
    from cwa.data.calibration import bos_for
    from cwa.data.text import batches_from_blocks, token_blocks

    blocks = token_blocks(
        loaded.tokenizer,
        texts,
        seq_len=data.seq_len,
        n_samples=data.n_samples,
        seed=seed,
        role="calibration",
        heldout_fraction=data.heldout_fraction,
        bos_token_id=bos_for(loaded.tokenizer, data.add_bos_token),
    )
    return batches_from_blocks(blocks, data.batch_size)


def calibration_of(loaded: Any, data: DataOptions, texts: list[str]) -> dict[str, Any]:
    """The run's record of its calibration text (source, sha256, BOS, held-out fraction)."""
    from cwa.data.calibration import bos_for, calibration_record

    return calibration_record(
        str(data.source),
        data.source_defaulted,
        texts,
        text_column=data.text_column,
        bos=bos_for(loaded.tokenizer, data.add_bos_token) is not None,
        heldout_fraction=data.heldout_fraction,
    )


def parse_metric_options(items: list[str] | None) -> dict[str, Any]:
    """``["rounds=2", "spike_threshold=20"]`` -> {"rounds": 2, "spike_threshold": 20.0}."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"metric option {item!r} is not KEY=VALUE (e.g. rounds=2)")
        value: Any = text.strip()
        lowered = value.lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
        options[key.strip()] = value
    return options


def _validate(config: ScoreConfig) -> None:
    from cwa.metrics import get_metric

    spec = get_metric(config.metric)  # unknown metric: registry error before anything is loaded
    unknown = sorted(set(config.options) - set(spec.options))
    if unknown:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise InvalidInput(
            f"metric {spec.name!r} has no option {unknown[0]!r}; its options: {allowed}"
        )
    from cwa.distributed import check_metric

    check_metric(spec.name)  # under torchrun: only metrics whose sums are all-reduced
    check_positive("n-samples", config.data.n_samples)
    check_positive("seq-len", config.data.seq_len, 2)
    check_positive("batch-size", config.data.batch_size)
    if config.probes is not None:
        check_positive("probes", config.probes)
    if not 0.0 < config.data.heldout_fraction < 1.0:
        raise InvalidInput(
            f"--heldout-fraction must be between 0 and 1 (exclusive), got "
            f"{config.data.heldout_fraction}; e.g. 0.1"
        )
    if not config.seeds:
        raise InvalidInput("--seeds is empty; give at least one seed")
    if config.score_dtype not in ("float32", "bfloat16"):
        raise InvalidInput(
            f"--score-dtype {config.score_dtype!r} is not supported; use float32 or bfloat16"
        )
    if config.components:
        from cwa.models.architecture import resolve_components

        resolve_components(config.components)
    if config.activation_checkpointing:
        from cwa.metrics.scoring import check_activation_checkpointing

        check_activation_checkpointing(spec, None)  # the model is checked once it is loaded


def check_layers(layers: list[int] | None, n_layers: int) -> None:
    """Layer indices must exist in the model (checked before a run is registered)."""
    bad = [layer for layer in layers or [] if layer >= n_layers]
    if bad:
        raise InvalidInput(f"layer {bad[0]} does not exist: the model has layers 0-{n_layers - 1}")


def run_score(
    store: Store,
    config: ScoreConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> list[RunOutcome]:
    """Score the model once per seed; returns one outcome per seed, in seed order.

    ``loaded`` reuses a model already loaded (by ``cwa run``) instead of loading it again.
    """
    from cwa.data.calibration import is_toy_model
    from cwa.metrics import get_metric
    from cwa.models.loading import load_model

    reporter = reporter or NULL_REPORTER
    _validate(config)
    texts = None
    if get_metric(config.metric).needs_data or config.data.source is not None:
        # A data-free metric (magnitude, random) on a real model needs no hub access; with
        # text (given, or the toy default) the run also records the calibration loss.
        texts = calibration_texts(config.data, config.model.ref)
    elif is_toy_model(config.model.ref):
        texts = calibration_texts(config.data, config.model.ref)
    attn = "eager" if config.metric in _DOUBLE_BACKWARD else None
    if loaded is None:
        loaded = load_model(
            config.model.ref,
            dtype=config.model.dtype,
            device=config.model.device,
            trust_remote_code=config.model.trust_remote_code,
            attn_implementation=attn,
            reporter=reporter,
            device_map=config.model.device_map,
        )
    from cwa.models.device_map import require_materialized

    require_materialized(loaded.model, "score")  # gradients need real tensors
    check_layers(config.layers, loaded.arch.n_layers)
    if config.activation_checkpointing:
        from cwa.metrics.scoring import check_activation_checkpointing

        check_activation_checkpointing(get_metric(config.metric), loaded.model)
    outcomes = []
    for seed in config.seeds:
        outcomes.append(_score_one(store, config, loaded, texts, seed, reporter, mlflow))
    return outcomes


def _score_one(
    store: Store,
    config: ScoreConfig,
    loaded: Any,
    texts: list[str] | None,
    seed: int,
    reporter: Reporter,
    mlflow: bool | None,
) -> RunOutcome:
    request = stage_request(
        "score",
        config,
        parents=[],
        experiment=config.experiment,
        model_ref=config.model.ref,
        seed=seed,
        omit=("seeds",),
        overrides={"seed": seed},
    )

    def compute(ctx: RunContext) -> StageOutput:
        from cwa.metrics import get_metric
        from cwa.metrics.scoring import score_model

        ctx.set_model(config.model.ref, loaded.fingerprint, loaded.device)
        spec = get_metric(config.metric)
        batches = None
        if texts is not None:
            batches = calibration_batches(loaded, config.data, seed, texts)
            ctx.record_config(calibration=calibration_of(loaded, config.data, texts))
        outcome = score_model(
            loaded.model,
            batches if (spec.needs_data or batches) else None,
            spec,
            arch=loaded.arch,
            out_path=ctx.artifact_path(SCORE_FILE, kind="scores"),
            layers=config.layers,
            components=config.components,
            probes=config.probes,
            seed=seed,
            score_dtype=config.score_dtype,
            options=config.options,
            reporter=ctx.reporter,
            activation_checkpointing=config.activation_checkpointing,
        )
        ctx.record_config(metric_config=outcome.config, signed=bool(spec.signed))
        tables: dict[str, Any] = {"tensor_stats": outcome.stats_frame()}
        supers = outcome.extra_tables.get("super_weights") or []
        if supers:
            tables["super_weights"] = [
                {
                    "layer": r["layer"],
                    "parameter": r["parameter"],
                    "row_index": r["row"],
                    "column_index": r["column"],
                    "input_channel": r["input_channel"],
                    "output_channel": r["output_channel"],
                    "input_activation": r["input_activation"],
                    "output_activation": r["output_activation"],
                    "weight_value": r["weight_value"],
                    "round": r.get("round"),
                    "input_spike_ratio": r.get("input_spike_ratio"),
                    "output_spike_ratio": r.get("output_spike_ratio"),
                }
                for r in supers
            ]
        profile = outcome.extra_tables.get("activation_profile") or []
        if profile:
            tables["activation_profile"] = profile
        metrics = {
            "n_tensors": float(len(outcome.parameters)),
            "n_scored": float(sum(s["numel"] for s in outcome.stats)),
        }
        if outcome.loss is not None:
            metrics["calibration_loss"] = float(outcome.loss)
        if outcome.n_tokens is not None:
            metrics["calibration_tokens"] = float(outcome.n_tokens)
        return StageOutput(tables=tables, metrics=metrics, value=outcome)

    from cwa.distributed import run_stage  # execute_stage on every rank of a torchrun world

    return run_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
