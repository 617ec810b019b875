"""Synthetic score runs for analysis tests: chosen scores written as real score runs.

``add_score_run`` registers a ``score`` run through the normal lifecycle with a score file
written by :class:`cwa.scorefile.ScoreFileWriter` and ``tensor_stats`` rows computed by the
scoring code's own statistics function, so analyzers see exactly what ``cwa score`` stores,
with scores the test controls (no gradients, no model weights needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCORE_FILE = "scores.safetensors"


def gpt2_config(n_layer: int = 2, n_embd: int = 16, n_head: int = 4, vocab: int = 50) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head
    )


def llama_gqa_config(n_layer: int = 3, hidden: int = 32, heads: int = 4, kv: int = 2) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def save_config_model(config: Any, folder: Path) -> Path:
    """A model folder with only config.json (enough for the meta-device architecture map)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """{parameter: shape} in named_parameters() order, from the config (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def random_scores(shapes: dict[str, tuple[int, ...]], seed: int, kind: str = "lognormal"):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if kind == "lognormal":
            out[name] = torch.exp(torch.randn(shape, generator=gen) * 2.0)
        else:
            out[name] = torch.rand(shape, generator=gen)
    return out


def add_score_run(
    store: Any,
    model_dir: Path | str,
    scores: dict[str, Any],
    *,
    seed: int = 0,
    metric: str = "random",
    experiment: str = "default",
    fingerprint: str | None = None,
) -> str:
    """Register a succeeded score run holding ``scores``; returns its run id."""
    import polars as pl

    from cwa.lifecycle import StageOutput, StageRequest, execute_stage
    from cwa.metrics.stats import score_stats
    from cwa.models.architecture import parse_layer_index
    from cwa.scorefile import write_score_file

    ref = str(model_dir)
    request = StageRequest(
        stage="score",
        config={"metric": metric, "seed": seed, "model": {"ref": ref}},
        experiment=experiment,
        model_ref=ref,
        seed=seed,
    )

    def compute(ctx):
        write_score_file(ctx.artifact_path(SCORE_FILE, kind="scores"), scores)
        rows = []
        for name, tensor in scores.items():
            row = score_stats(tensor.reshape(-1).numpy())
            row.update(parameter=name, layer=parse_layer_index(name), component="other")
            rows.append(row)
        ctx.set_model(ref, fingerprint or f"fp-{ref}", "cpu")
        return StageOutput(tables={"tensor_stats": pl.DataFrame(rows)}, metrics={})

    return execute_stage(store, request, compute, mlflow=False).run_id


def run_count(store: Any) -> int:
    with store.read() as con:
        return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])


def named_query(name: str) -> str:
    """The SQL under ``-- name: NAME`` in examples/queries.sql (up to the next header)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "examples" / "queries.sql").read_text()
    parts = re.split(r"^-- name:\s*(\S+)\s*$", text, flags=re.M)
    found = dict(zip(parts[1::2], parts[2::2], strict=True))
    return found[name].strip()
