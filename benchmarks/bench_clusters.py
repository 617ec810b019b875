"""Benchmark: the ``clusters`` analyzer on a GPT-2-small-sized model vs reading its files once.

A synthetic GPT-2 small (``GPT2Config()``: 124,439,808 weights in 148 tensors) gets a score
run (log-normal random scores) and a checkpoint folder (config.json + model.safetensors with
N(0, 0.02) weights), both written tensor by tensor. Timed side by side in this process, page
cache warm, median of ``--repeats``:

* ``read once``: load and sum every tensor of the score file (bench_analyze's ``read_once``),
  and the same for the checkpoint: the clusters analyzer needs |w|, so the least it can do is
  look at both files once;
* ``clusters``: the analyzer's computation (``spec.run``: one lockstep pass over both files,
  top-N 1000 + 5000 sampled weights, k-means with 4 clusters, silhouette) and the whole
  ``run_analyze`` stage (validation, registration, computation, one write transaction).

Ratios = analyzer time / read time. Memory: peak growth of anonymous resident memory during the
computation next to the largest tensor (the design: O(largest tensor + N + sample)).

Run: ``python benchmarks/bench_clusters.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CWA_MLFLOW", "0")

from bench_analyze import AnonPeak, _median_time, _shapes, make_score_run, read_once  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-n", type=int, default=1000)
    parser.add_argument("--sample-size", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def write_checkpoint(model_dir: Path, shapes: dict) -> Path:
    """model.safetensors of random weights, tensor by tensor (a score-file writer is a plain
    safetensors writer)."""
    import torch

    from cwa.scorefile import ScoreFileWriter

    gen = torch.Generator().manual_seed(123)
    path = model_dir / "model.safetensors"
    with ScoreFileWriter(path, list(shapes.items()), metadata={"format": "pt"}) as writer:
        for name, shape in shapes.items():
            writer.write(name, torch.randn(shape, generator=gen) * 0.02)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import GPT2Config

    from cwa.progress import NULL_REPORTER
    from cwa.stages.analyze import AnalyzeConfig, prepare_analysis, run_analyze
    from cwa.store import Store

    shapes = _shapes()
    n_weights = sum(int(torch.Size(s).numel()) for s in shapes.values())
    largest = max(int(torch.Size(s).numel()) for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="cwa_bench_clusters_") as tmp:
        model_dir = Path(tmp) / "gpt2-small"
        GPT2Config().save_pretrained(model_dir)
        print(f"writing a score run and a checkpoint of {n_weights:,} weights ...")
        checkpoint = write_checkpoint(model_dir, shapes)
        store = Store.open(Path(tmp) / "store")
        run_id = make_score_run(store, model_dir, shapes, 0)
        scores = store.artifacts_dir(run_id) / "scores.safetensors"
        read_once(scores), read_once(checkpoint)  # warm the page cache
        t_scores, _ = _median_time(lambda: read_once(scores), args.repeats)
        t_weights, _ = _median_time(lambda: read_once(checkpoint), args.repeats)

        options = {"top_n": str(args.top_n), "sample_size": str(args.sample_size)}
        config = AnalyzeConfig("clusters", runs=[run_id], options=options)
        spec, inputs, parsed = prepare_analysis(store, config)
        inputs.architecture(inputs.runs[0])
        with AnonPeak() as memory:
            t_compute, result = _median_time(
                lambda: spec.run(inputs, parsed, NULL_REPORTER), args.repeats
            )
        t_stage, _ = _median_time(lambda: run_analyze(store, config, mlflow=False), args.repeats)
        n = int(result.metrics["n_weights"])
        both = t_scores + t_weights
        print(f"\nread once: score file {t_scores:.2f} s, checkpoint {t_weights:.2f} s")
        print(f"largest tensor: {largest:,} values = {largest * 4 / 2**20:.0f} MiB float32")
        print(f"clusters: {n} weights clustered (top-N {args.top_n} + sample {args.sample_size})")
        print(f"  compute {t_compute:.2f} s = {t_compute / t_scores:.2f} x reading the score file,"
              f" {t_compute / both:.2f} x reading score file + checkpoint")  # fmt: skip
        print(f"  whole stage {t_stage:.2f} s = {t_stage / both:.2f} x reading both files")
        largest_mib = largest * 4 / 2**20
        print(f"  peak anonymous memory growth {memory.growth_mib:.0f} MiB "
              f"({memory.growth_mib / largest_mib:.2f} x the largest tensor)")  # fmt: skip


if __name__ == "__main__":
    main()
