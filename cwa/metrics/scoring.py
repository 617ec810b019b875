"""Score a model with one metric and stream the per-weight scores to a safetensors file.

:func:`score_model` is the library entry point behind ``cwa score``. It resolves the selection
(layers / components) through the architecture map, runs the metric in ``model.eval()`` mode
(so dropout is off; every module's previous mode is restored afterwards), and for each tensor the
metric yields, in order: marks out-of-scope elements, refuses non-finite scores, casts to the
score dtype, computes the ``tensor_stats`` row and appends the tensor to the score file. At most
one finished score tensor is alive at a time in this driver.

Scope: a parameter partly in scope (e.g. GPT-2's fused ``c_attn`` when only ``attn_q`` is
selected) is stored with its full shape; its out-of-scope elements are stored as NaN, which
means "not scored". Rankings skip NaN, and statistics cover in-scope elements only. Because
in-scope non-finite scores raise :class:`~cwa.errors.NonFiniteError`, a NaN in a score file is
always an out-of-scope element.

Return value: plain data (:class:`ScoreOutcome`: dicts and lists; ``stats_frame()`` builds a
polars DataFrame) for the caller to store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cwa.errors import InvalidInput, NonFiniteError, UnsupportedArchitecture
from cwa.metrics.base import Batch, MetricSpec, ScoringContext, calibration_loss, count_targets
from cwa.metrics.stats import STAT_COLUMNS, score_stats
from cwa.progress import NULL_REPORTER, Reporter
from cwa.scorefile import ScoreFileWriter

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATS_COLUMNS: tuple[str, ...] = ("parameter", "layer", "component", *STAT_COLUMNS)
SCORE_FILE_FORMAT = "cwa-scores/1"


@dataclass
class ScoreOutcome:
    """What a scoring pass produced (the score tensors themselves are in ``score_path``)."""

    metric: str
    metric_version: str
    config: dict[str, Any]
    loss: float | None
    n_tokens: int | None
    n_sequences: int | None
    score_path: Path
    score_dtype: str
    parameters: list[str]
    stats: list[dict[str, Any]]
    extra_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def stats_frame(self) -> Any:
        """The ``tensor_stats`` rows as a polars DataFrame (columns in STATS_COLUMNS order)."""
        import polars as pl

        schema = {
            "parameter": pl.String,
            "layer": pl.Int64,
            "component": pl.String,
            "numel": pl.Int64,
            "zeros": pl.Int64,
            "nonfinite": pl.Int64,
        }
        schema.update({c: pl.Float64 for c in STATS_COLUMNS if c not in schema})
        return pl.DataFrame(self.stats, schema=schema, orient="row")


@dataclass(frozen=True)
class Selection:
    """Parameters in scope, in architecture order, with partial-scope masks (None = whole)."""

    names: list[str]
    masks: dict[str, torch.Tensor | None]
    components: dict[str, str]  # in-scope components, comma-joined


def resolve_selection(
    model: torch.nn.Module,
    arch: Any,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
) -> Selection:
    """Resolve --layers / --components to parameter names and element masks."""
    from cwa.models.architecture import resolve_components

    layers = None if layers is None else sorted({int(x) for x in layers})
    expanded = resolve_components(components)
    components = None if expanded is None else list(expanded)
    names = list(arch.select(layers=layers, components=components))
    if not names:
        raise InvalidInput(
            f"no parameters match layers={layers} components={components}; check the values "
            "against the model's architecture ('cwa inspect')"
        )
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise UnsupportedArchitecture(
            f"the architecture map names {missing[0]!r} but the model has no such parameter; "
            "build the map from this model"
        )
    masks: dict[str, torch.Tensor | None] = {}
    component_labels: dict[str, str] = {}
    for name in names:
        mask = None
        if layers is not None or components is not None:
            mask = arch.scope_mask(name, layers=layers, components=components)
        if mask is not None:
            mask = mask.to(device="cpu", dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        masks[name] = mask
        own = arch.params[name].components
        in_scope = [c for c in own if components is None or c in components]
        component_labels[name] = ",".join(in_scope or own)
    return Selection(names, masks, component_labels)


def _expanded_components(components: Iterable[str] | None) -> list[str] | None:
    from cwa.models.architecture import resolve_components

    expanded = resolve_components(components)
    return None if expanded is None else list(expanded)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every module in eval mode (dropout off); restore each module's own mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def _resolve_options(
    spec: MetricSpec, options: dict[str, Any] | None, probes: int | None
) -> dict[str, Any]:
    resolved = dict(spec.options)
    given = dict(options or {})
    if probes is not None:
        if "probes" not in spec.options:
            raise InvalidInput(
                f"--probes applies to Hessian metrics (hutchinson_diag, obd), not {spec.name!r}"
            )
        given["probes"] = probes
    unknown = sorted(set(given) - set(resolved))
    if unknown:
        allowed = ", ".join(sorted(resolved)) or "none"
        raise InvalidInput(
            f"metric {spec.name!r} has no option {unknown[0]!r}; its options: {allowed}"
        )
    resolved.update(given)
    return resolved


def _prepare_tensor(
    score: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, np.ndarray]:
    """(tensor to store, its in-scope values as a flat float32 array) for one raw score."""
    score = score.detach().to(device="cpu", dtype=torch.float32)
    if mask is not None:
        score = score.masked_fill(~mask, float("nan"))  # out of place: never touch a weight
    stored = score.to(dtype).contiguous()
    values = stored.float().numpy().reshape(-1)
    if mask is not None:
        values = values[mask.numpy().reshape(-1)]
    return stored, values


def _tensor_stats(
    name: str, values: np.ndarray, raw: torch.Tensor, owned: bool, dtype: torch.dtype, metric: str
) -> dict[str, Any]:
    """Statistics of the stored in-scope values; refuses non-finite ones (named tensor).

    Finiteness is checked on the values as stored (an overflowing cast is caught too) by the
    statistics pass itself, which sorts them anyway. The sort happens in place when
    ``values`` is a copy made here or the metric owns ``raw``; by then it has been written.
    """
    aliases_raw = values.size > 0 and values.ctypes.data == raw.data_ptr()
    stats = score_stats(values, overwrite=owned or not aliases_raw)
    if stats["nonfinite"]:
        raise NonFiniteError(
            f"metric {metric!r} produced {stats['nonfinite']} non-finite scores in {name!r} "
            f"(stored as {str(dtype).removeprefix('torch.')}); check the model weights, load "
            "it in float32 (--dtype float32) or use --score-dtype float32"
        )
    return stats


def check_activation_checkpointing(spec: MetricSpec, model: torch.nn.Module | None) -> None:
    """Refuse --activation-checkpointing where it cannot apply (before a run is registered)."""
    if not spec.uses_backward:
        raise InvalidInput(
            f"--activation-checkpointing applies to metrics that run backward passes "
            f"(grad_x_weight, grad_squared, hutchinson_diag, obd), not {spec.name!r}; drop it"
        )
    if model is not None:
        from cwa.metrics.checkpointing import decoder_blocks

        decoder_blocks(model)  # raises UnsupportedArchitecture when there are no blocks


def score_model(
    model: torch.nn.Module,
    batches: Sequence[Batch] | None,
    metric: str | MetricSpec,
    *,
    arch: Any,
    out_path: str | Path,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
    probes: int | None = None,
    seed: int = 0,
    score_dtype: str = "float32",
    options: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    activation_checkpointing: bool = False,
) -> ScoreOutcome:
    """Score every selected weight of ``model`` with ``metric`` and write ``out_path``.

    ``batches``: calibration batches (dicts with ``input_ids`` [B, T] and optional
    ``attention_mask``); required by data metrics, used for the calibration loss otherwise.
    ``arch``: the model's :class:`cwa.models.architecture.ArchitectureMap`.
    ``probes``: Hutchinson probes (hutchinson_diag / obd only). ``options``: metric-specific
    options (e.g. ``{"micro_batch_size": 4}`` for grad_squared).
    ``activation_checkpointing``: recompute decoder-block activations during backward (gradient
    and Hessian metrics only; see :mod:`cwa.metrics.checkpointing`); same scores, less memory.
    """
    from cwa.metrics import get_metric

    reporter = reporter or NULL_REPORTER
    spec = metric if isinstance(metric, MetricSpec) else get_metric(metric)
    if score_dtype not in SCORE_DTYPES:
        raise InvalidInput(
            f"score dtype {score_dtype!r} is not supported; use one of {', '.join(SCORE_DTYPES)}"
        )
    dtype = SCORE_DTYPES[score_dtype]
    resolved_options = _resolve_options(spec, options, probes)
    if activation_checkpointing:
        check_activation_checkpointing(spec, model)
    batches = list(batches) if batches is not None else None
    if spec.needs_data and not batches:
        raise InvalidInput(f"metric {spec.name!r} needs calibration data; pass --data")
    from cwa import distributed

    distributed.check_metric(spec.name)
    # torchrun: this rank's round-robin share of the batches (the list itself in one process).
    had_batches = bool(batches)
    batches = distributed.shard_batches(batches)
    writes = distributed.world().is_writer
    layers = None if layers is None else sorted({int(x) for x in layers})
    components = _expanded_components(components)
    selection = resolve_selection(model, arch, layers, components)
    parameters = dict(model.named_parameters())
    config: dict[str, Any] = {
        "metric": spec.name,
        "metric_version": spec.version,
        "seed": int(seed),
        "score_dtype": score_dtype,
        "layers": layers,
        "components": components,
        **resolved_options,
    }
    if activation_checkpointing:  # recorded only when on: other runs' configs stay as they were
        config["activation_checkpointing"] = True
    ctx = ScoringContext(
        model=model,
        batches=batches,
        arch=arch,
        selected=selection.names,
        scope_masks=selection.masks,
        parameters={n: parameters[n] for n in selection.names},
        seed=int(seed),
        options=resolved_options,
        reporter=reporter,
    )
    out_path = Path(out_path)
    stats_rows: list[dict[str, Any]] = []
    from cwa.metrics.checkpointing import activation_checkpointing as checkpointed_blocks

    with _eval_mode(model), checkpointed_blocks(model, activation_checkpointing):
        plan = spec.planned(ctx)
        entries = [(name, tuple(parameters[name].shape)) for name in plan]
        metadata = {
            "format": SCORE_FILE_FORMAT,
            "config": json.dumps(config, sort_keys=True, default=str),
        }
        handle = reporter.task(f"{spec.name}: tensors", len(plan))
        produced = iter(spec.compute(ctx))
        try:
            with (
                ScoreFileWriter(out_path, entries, score_dtype, metadata)
                if writes
                else nullcontext()
            ) as writer:
                for name, raw in produced:
                    if name not in ctx.scope_masks:
                        raise InvalidInput(f"metric {spec.name!r} scored unselected {name!r}")
                    if not writes:  # torchrun: only rank 0 writes (its scores are the same)
                        del raw
                        handle.advance()
                        continue
                    stored, values = _prepare_tensor(raw, ctx.scope_masks[name], dtype)
                    writer.write(name, stored)
                    del stored
                    stats = _tensor_stats(name, values, raw, spec.owns_output, dtype, spec.name)
                    del raw, values
                    info = arch.params[name]
                    stats_rows.append(
                        {
                            "parameter": name,
                            "layer": info.layer,
                            "component": selection.components[name],
                            **stats,
                        }
                    )
                    handle.advance()
        finally:
            handle.close()
            close = getattr(produced, "close", None)
            if close is not None:  # run the metric's cleanup (grad flags) now, not at GC
                close()
        if ctx.loss is None and had_batches:
            ctx.loss, ctx.n_tokens = calibration_loss(model, batches, reporter)
            ctx.n_sequences = count_targets(batches)[1]
    config.update(ctx.config)
    return ScoreOutcome(
        metric=spec.name,
        metric_version=spec.version,
        config=config,
        loss=ctx.loss,
        n_tokens=ctx.n_tokens,
        n_sequences=ctx.n_sequences,
        score_path=out_path,
        score_dtype=score_dtype,
        parameters=plan,
        stats=stats_rows,
        extra_tables=ctx.extra_tables,
    )
