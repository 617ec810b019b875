"""``cwa rank``: top-k weights of a score run."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import command_line, mlflow_flag, open_store, print_outcomes, reporter_for
from cwa_cli._options import ComponentsOpt, DeviceMapOpt, LayersOpt
from cwa_cli._state import state


@error_boundary
def rank_cmd(
    ctx: typer.Context,
    score_run: Annotated[
        str, typer.Argument(help="Score run id, prefix, or 'latest' (the newest score run).")
    ] = "latest",
    topk: Annotated[
        str,
        typer.Option(
            "--topk", "-k", help="Weights per group, 'all' (every weight in scope; warns), or N% "
            "(global mode: exact selection stored compactly, first rows in ranked_weights)."
        ),
    ] = "100",
    mode: Annotated[
        str, typer.Option("--mode", help="global, layer, tensor, head or component.")
    ] = "global",
    per: Annotated[
        str,
        typer.Option(
            "--per",
            help="With --topk N%: compare weights across the whole scope (global), within each "
            "tensor (tensor: layer-wise pruning), or within each output row of a Linear/Conv1D "
            "weight (row: Wanda's comparison group). --bottom selects within the same groups.",
        ),
    ] = "global",
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            help="Ranking key: abs (|score|) or value. Default: abs for metrics whose scores "
            "can be negative (hutchinson_diag, obd), value otherwise. Controls use the same key.",
        ),
    ] = None,
    head_grouping: Annotated[
        str,
        typer.Option(
            "--head-grouping",
            help="Head mode groups: kv = one group per key-value head with the query heads "
            "that read it (q rows, o columns, shared k/v rows; GQA-correct), component = one "
            "group per (component, head).",
        ),
    ] = "kv",
    bottom: Annotated[
        bool, typer.Option("--bottom", help="The least sensitive weights instead.")
    ] = False,
    layers: LayersOpt = None,
    components: ComponentsOpt = None,
    device_map: DeviceMapOpt = None,
    export: Annotated[
        str | None, typer.Option("--export", help="Also write the rows to a .csv or .parquet file.")
    ] = None,
    show: Annotated[int, typer.Option("--show", help="Rows to print (0: none).")] = 10,
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Label (default: the score run's).")
    ] = None,
) -> None:
    """Rank the weights of a score run; prints the rank run id and the top rows.

    Head mode groups attention weights by key-value head (--head-grouping kv,
    the default): group "layer=L,kv_head=J" holds kv head J's k/v rows and the
    query heads that read it (their q rows and o columns), so under grouped-query
    attention (Llama-3, Mistral, Qwen2) each group can be removed from the forward
    pass on its own. --head-grouping component gives one group per (component,
    head) instead ("layer=L,attn_q,head=H").

    Ranking key: |score| for metrics with negative scores (hutchinson_diag, obd),
    the score otherwise; --by abs|value overrides. Controls use the same key.

    Examples:
      cwa rank latest --topk 1000
      cwa rank 01J9Z3 --mode head -k 20 --components attn_q,attn_k,attn_v
      cwa rank latest -k 100 --export top_weights.csv
      cwa rank latest --topk 50% --bottom --per row   # Wanda: half of each output row
    """
    from cwa.parsing import parse_int_list, parse_name_list
    from cwa.stages.rank import RankConfig, run_rank

    config = RankConfig(
        score_run=score_run,
        topk=topk.strip().lower() if topk.strip().lower() == "all" else _int_topk(topk),
        mode=mode,
        per=per,
        by=by,
        head_grouping=head_grouping,
        bottom=bottom,
        layers=parse_int_list(layers, what="layer"),
        components=parse_name_list(components),
        export=export,
        experiment=experiment,
        command=command_line(),
        device_map=device_map,
    )
    with reporter_for(ctx) as reporter:
        outcome = run_rank(
            open_store(ctx, must_exist=True), config, reporter=reporter, mlflow=mlflow_flag(ctx)
        )
    print_outcomes(ctx, [outcome])
    frame = outcome.value
    chatty = not state(ctx).json and not state(ctx).quiet
    if show > 0 and chatty and frame is not None and frame.height:
        columns = [
            "group_key",
            "rank",
            "parameter",
            "row_index",
            "column_index",
            "layer",
            "component",
            "head",
            "score",
            "weight_value",
        ]
        head = frame.select(columns).head(show)
        _output.stderr.print(_output.table(columns, head.rows(), title="top rows"))


def _int_topk(text: str) -> int:
    from cwa.errors import InvalidInput

    if text.strip().endswith("%"):  # a fraction of the weights in scope (global mode)
        return text.strip()  # type: ignore[return-value]
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"--topk {text!r}: give a whole number, N% or 'all'") from None
