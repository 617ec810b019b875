"""profile's link to a rank run: which rank run to use, and its top-k weights per group."""

from __future__ import annotations

from typing import Any

from cwa.errors import InvalidInput


def topk_counts(rows: list[dict[str, Any]], ranked: Any, group_size: int) -> None:
    """Count the rank run's weights per group (columns of ``ranked_weights``)."""
    import polars as pl

    k = ranked.height
    if k == 0:
        return
    ranked = ranked.with_columns(  # all-NULL columns (no head among the top-k) come back untyped
        pl.col("parameter").cast(pl.String),
        pl.col("component").cast(pl.String),
        pl.col("layer").cast(pl.Int64),
        pl.col("head").cast(pl.Int64),
    )
    layer_key = pl.concat_str(pl.lit("layer="), pl.col("layer").cast(pl.String).fill_null("none"))
    kv = (
        pl.when(pl.col("component").is_in(["attn_k", "attn_v"]))
        .then(pl.col("head"))
        .otherwise(pl.col("head") // group_size)
    )
    keyed = ranked.with_columns(
        pl.lit("all").alias("model"),
        pl.col("parameter").alias("tensor"),
        pl.when(pl.col("layer").is_not_null()).then(layer_key).alias("layer_k"),
        pl.col("component").alias("component_k"),
        pl.when(pl.col("layer").is_not_null())
        .then(pl.concat_str(layer_key, pl.lit(","), pl.col("component")))
        .alias("layer_component"),
        pl.concat_str(
            layer_key,
            pl.lit(","),
            pl.col("component"),
            pl.lit(",head="),
            pl.col("head").cast(pl.String),
        ).alias("head_k"),
        pl.concat_str(layer_key, pl.lit(",kv_group="), kv.cast(pl.String)).alias("kv_group"),
    )
    columns = {
        "model": "model",
        "tensor": "tensor",
        "layer": "layer_k",
        "component": "component_k",
        "layer_component": "layer_component",
        "head": "head_k",
        "kv_group": "kv_group",
    }
    counts: dict[tuple[str, str], int] = {}
    for level, column in columns.items():
        for key, count in keyed.group_by(column).len().iter_rows():
            if key is not None:
                counts[(level, key)] = int(count)
    for row in rows:
        row["topk_count"] = counts.get((row["level"], row["group_key"]), 0)
        row["topk_share"] = row["topk_count"] / k


def rank_run_for(inputs: Any, run: Any, choice: str) -> str | None:
    from cwa.store.runs import fetch_run, resolve_run_id

    if choice == "none":
        return None
    if choice == "auto":
        for child in inputs.child_runs(run, "rank"):
            with inputs.store.read() as con:
                if fetch_run(con, child).config.get("mode", "global") == "global":
                    return child
        return None
    with inputs.store.read() as con:
        rank_id = resolve_run_id(con, choice, stage="rank")
        record = fetch_run(con, rank_id)
    if run.run_id not in [p for p, _ in record.parents]:
        raise InvalidInput(
            f"rank run {rank_id} ranks score run {record.config.get('score_run')}, not "
            f"{run.run_id}; give a rank run of this score run"
        )
    if record.config.get("mode", "global") != "global":
        raise InvalidInput(
            f"rank run {rank_id} is in {record.config.get('mode')} mode; use a global ranking"
        )
    return rank_id
