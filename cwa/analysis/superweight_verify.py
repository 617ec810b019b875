"""Core of the ``super-weights`` analyzer: the activation profile and the ablation test.

Profile: one row per MLP down projection (and detection round) with the largest |input| and
|output| activation and their channels, from the score run's ``activation_profile`` rows when
the run recorded them (their spike ratios are max / median over the projection's channels),
else from its ``super_weights`` candidates. ``layer_input_ratio`` / ``layer_output_ratio``
divide a layer's maximum by the median of that maximum over layers: a layer whose activations
spike far above the others' is where a super weight acts.

Verification (Yu et al. 2024: removing one super weight destroys the model, removing a random
weight does nothing): the model is evaluated unmodified, then with each candidate alone set to
zero, then — as controls — with one random weight of the same tensor set to zero, for each of
``seeds`` (drawn with :func:`cwa.perturbation.selection.random_k`, the candidate excluded). Every
change goes through :func:`cwa.perturbation.apply.perturbed`, which saves only the touched
weight and restores it bit-exactly (verified by checksum) before the next evaluation.

The rule (thresholds are options, recorded in ``rule``): a candidate is a **super weight** when

    zeroed / baseline >= min_ratio        (the damage is large in absolute terms)
    and (zeroed - control_mean) / control_sd >= min_z   (far outside the controls' spread)
    and zeroed > max(control zeroed)      (worse than every control)

With a control spread of exactly 0 the z-test is replaced by ``zeroed > control_mean``. A
candidate whose weight is already 0 changes nothing when zeroed and is never a super weight.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def rule_text(min_ratio: float, min_z: float) -> str:
    return f"ratio>={min_ratio:g} & z>={min_z:g} & zeroed>control_max"


def verdict(
    baseline: float, zeroed: float, controls: Sequence[float], min_ratio: float, min_z: float
) -> dict[str, Any]:
    """Ratio, control statistics, z-score and the super-weight verdict of one candidate."""
    ratio = zeroed / baseline if baseline else math.inf
    mean = statistics.fmean(controls) if controls else None
    sd = statistics.stdev(controls) if len(controls) > 1 else None
    top = max(controls) if controls else None
    if mean is None:
        z = None
        outside = False
    elif sd:
        z = (zeroed - mean) / sd
        outside = z >= min_z
    else:
        z = None
        outside = zeroed > mean
    large = ratio >= min_ratio or zeroed == math.inf  # a diverged model counts as destroyed
    real = large and outside and (top is None or zeroed > top)
    return {
        "ratio": ratio,
        "control_mean": mean,
        "control_sd": sd,
        "control_max": top,
        "n_controls": len(controls),
        "z_score": z,
        "is_super_weight": real,
    }


def verify_candidates(
    model: Any,
    candidates: list[dict[str, Any]],
    evaluate: Callable[[], float],
    *,
    seeds: Sequence[int],
    min_ratio: float,
    min_z: float,
    reporter: Any = None,
) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Zero each candidate alone and ``len(seeds)`` random weights of its tensor; returns
    (baseline, one verdict row per candidate, one row per control ablation).

    ``candidates``: dicts with ``parameter`` and ``flat_index`` (others are passed through);
    ``evaluate()`` returns the perplexity of the model as it currently is.
    """
    import torch

    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.scope import ScopeEntry
    from cwa.perturbation.selection import Selection, random_k
    from cwa.progress import NULL_REPORTER

    reporter = reporter or NULL_REPORTER
    params = dict(model.named_parameters())
    baseline = float(evaluate())
    rows: list[dict[str, Any]] = []
    control_rows: list[dict[str, Any]] = []
    task = reporter.task("super-weight ablations", len(candidates) * (1 + len(seeds)))
    try:
        for cand in candidates:
            name, flat = cand["parameter"], int(cand["flat_index"])
            index = torch.tensor([flat], dtype=torch.int64)
            selection = Selection({name: index}, kind="super_weight_candidate")
            with perturbed(model, selection, "zero", reporter=reporter):
                zeroed = float(evaluate())
            task.advance()
            controls = []
            scope = [ScopeEntry(name, params[name].numel())]
            for seed in seeds:
                drawn = random_k(scope, 1, int(seed), exclude={name: index})
                (control_flat,) = drawn[name].tolist()
                value = float(params[name].detach().reshape(-1)[control_flat])
                with perturbed(model, drawn, "zero", reporter=reporter):
                    control = float(evaluate())
                controls.append(control)
                control_rows.append(
                    {"parameter": name, "candidate_index": flat, "seed": int(seed),
                     "flat_index": int(control_flat), "weight_value": value, "zeroed": control}
                )  # fmt: skip
                task.advance()
            rows.append(
                {**cand, "baseline": baseline, "zeroed": zeroed,
                 **verdict(baseline, zeroed, controls, min_ratio, min_z)}
            )  # fmt: skip
    finally:
        task.close()
    return baseline, rows, control_rows


def profile_rows(activation_profile: Any, candidates: Any) -> Any:
    """The per-layer profile frame (see the module docstring) from the score run's
    ``activation_profile`` rows (may be None or empty) or its candidates."""
    import polars as pl

    if activation_profile is not None and activation_profile.height:
        frame = activation_profile.select(
            "layer", "parameter", "round", "max_input_abs", "input_channel", "input_spike_ratio",
            "max_output_abs", "output_channel", "output_spike_ratio",
        ).with_columns(pl.lit("activation_profile").alias("source"))  # fmt: skip
    else:
        frame = candidates.select(
            "layer",
            "parameter",
            pl.col("round") if "round" in candidates.columns else pl.lit(None, dtype=pl.Int64),
            pl.col("input_activation").alias("max_input_abs"),
            "input_channel",
            pl.lit(None, dtype=pl.Float64).alias("input_spike_ratio"),
            pl.col("output_activation").alias("max_output_abs"),
            "output_channel",
            pl.lit(None, dtype=pl.Float64).alias("output_spike_ratio"),
        ).with_columns(pl.lit("candidates").alias("source"))
        frame = frame.rename({frame.columns[2]: "round"})
    frame = frame.with_columns(pl.col("round").cast(pl.Int64))
    over = pl.col("round").fill_null(0)
    return frame.with_columns(
        (pl.col("max_input_abs") / pl.col("max_input_abs").median().over(over)).alias(
            "layer_input_ratio"
        ),
        (pl.col("max_output_abs") / pl.col("max_output_abs").median().over(over)).alias(
            "layer_output_ratio"
        ),
    ).sort(["round", "layer"], nulls_last=True)
