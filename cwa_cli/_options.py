"""Shared ``Annotated`` option aliases, so every command spells common options the same way."""

from __future__ import annotations

from typing import Annotated

import typer

RunRef = Annotated[
    str,
    typer.Argument(
        help="Run id, a unique prefix of one, 'latest' or 'latest:STAGE'.", show_default=False
    ),
]
StageOpt = Annotated[str | None, typer.Option("--stage", help="Only runs of this stage.")]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", "-e", help="Experiment/group label.")
]
StatusOpt = Annotated[
    str | None,
    typer.Option("--status", help="running, succeeded, failed or interrupted."),
]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", help="Show at most this many rows.")]

# -- model and data options shared by the stages ------------------------------------------
ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hugging Face name, local folder, or 'toy' / 'toy-llama'."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model over devices with accelerate: auto, balanced, or a JSON file "
        "{module: device} (GPU index, cuda:N, mps, cpu, disk). Needs the multi-device extra.",
        show_default=False,
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow model code from the hub (off by default)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Calibration text: 'toy', a .txt/.jsonl/.parquet file, or "
        "hf:NAME[:CONFIG]:SPLIT:COLUMN. Default: toy text for the toy models, "
        "hf:wikitext:wikitext-2-raw-v1:train:text for any other model.",
        show_default=False,
    ),
]
HeldoutFractionOpt = Annotated[
    float,
    typer.Option(
        "--heldout-fraction",
        help="Tail of the calibration text kept out of calibration (perplexity on the same "
        "text scores only this part).",
    ),
]
TextColumnOpt = Annotated[
    str | None, typer.Option("--text-column", help="Column holding the text (jsonl/parquet).")
]
NSamplesOpt = Annotated[int, typer.Option("--n-samples", help="Calibration sequences.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ExperimentLabelOpt = Annotated[
    str, typer.Option("--experiment", "-e", help="Experiment/group label for the run(s).")
]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Layer indices, e.g. '0-5' or '0,2,4'.")
]
ComponentsOpt = Annotated[
    str | None,
    typer.Option(
        "--components", help="Components, e.g. 'attn_q,mlp_down' (see cwa model inspect)."
    ),
]
ListOpt = Annotated[bool, typer.Option("--list", help="List the available choices and exit.")]
