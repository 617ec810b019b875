"""Does reporting dominate a run? Report time / score-stage time, measured side by side.

Two stores, each built and reported on in this one process:

1. a full study of the toy model: ``cwa run`` with every analysis switch (one score run per
   seed, k-curve, clustered perturbation, downstream tasks, profile, clusters, correlation,
   stability, effects), then ``cwa report`` over the whole experiment;
2. a 124M-weight score run: a GPT-2-small-shaped model (124,439,808 weights, randomly
   initialised, saved locally with the toy tokenizer, since tests and benchmarks are offline)
   scored with grad_x_weight by the real score stage (score file written tensor by tensor, per
   tensor statistics), ranked (top 1,000), then reported.

Printed: each stage's wall and CPU time and the ratios report / score (target < 1); CPU time
is the fairer measure on a shared machine. The toy study's score stage is run once more right
before the report so the two are measured side by side. The report is timed cold (its first
matplotlib import is inside it), in PNG + PDF + SVG, MLflow off.

    python benchmarks/bench_report.py [--skip-124m] [--seeds 0,1,2] [--n-samples 32] [--limit 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _timed(fn, *args, **kwargs):
    """(value, wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start, time.process_time() - cpu


def toy_study(root: Path, seeds: list[int], n_samples: int, limit: int) -> dict[str, float]:
    from cwa.stages.common import ModelOptions
    from cwa.stages.pipeline import PipelineConfig, run_pipeline
    from cwa.stages.pipeline_analysis import AnalysisSwitches
    from cwa.stages.report import ReportConfig, run_report
    from cwa.stages.score import DataOptions
    from cwa.store import Store

    store = Store.open(root / "toy_store")
    config = PipelineConfig(
        model=ModelOptions("toy", "float32", "cpu", False),
        data=DataOptions("toy", None, n_samples, 128, 8),
        topk=263,
        seeds=seeds,
        tasks="perplexity",
        limit=limit,
        experiment="toy-study",
        analyses=AnalysisSwitches(
            weight_analysis=True,
            architecture_analysis=True,
            temporal_stability=True,
            downstream_tasks=True,
            advanced_perturbations=True,
        ),
    )
    result, chain_s, _ = _timed(run_pipeline, store, config, mlflow=False)
    # The score stage of this study once more, timed beside the report: one run per seed.
    from cwa.models.loading import load_model
    from cwa.stages.score import ScoreConfig, run_score

    loaded = load_model("toy", dtype="float32", device="cpu")
    scores, score_s, score_cpu = _timed(
        run_score,
        store,
        ScoreConfig(model=config.model, data=config.data, seeds=seeds, experiment="toy-study"),
        mlflow=False,
        loaded=loaded,
    )
    report, report_s, report_cpu = _timed(
        run_report, store, ReportConfig(experiment="toy-study"), mlflow=False
    )
    # The same report with PNG only (matplotlib now warm): what the vector files cost.
    _, png_s, png_cpu = _timed(
        run_report, store, ReportConfig(experiment="toy-study", formats=["png"]), mlflow=False
    )
    return {
        "png_s": png_s,
        "png_cpu": png_cpu,
        "chain_s": chain_s,
        "score_runs": len(scores),
        "score_s": score_s,
        "score_cpu": score_cpu,
        "report_s": report_s,
        "report_cpu": report_cpu,
        "figures": len(report.value["figures"]),
        "runs": len(report.value["runs"]),
    }


def gpt2_small(folder: Path) -> Path:
    """A randomly initialised GPT-2-small-shaped model with the toy tokenizer, saved locally."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.toy import ensure_toy_model

    toy = Path(ensure_toy_model("gpt2"))
    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (toy / name).exists():
            shutil.copy(toy / name, folder / name)
    return folder


def large_score_run(root: Path, n_samples: int) -> dict[str, float]:
    from cwa.stages.common import ModelOptions
    from cwa.stages.rank import RankConfig, run_rank
    from cwa.stages.report import ReportConfig, run_report
    from cwa.stages.score import DataOptions, ScoreConfig, run_score
    from cwa.store import Store
    from cwa.toy import ensure_toy_data

    folder = gpt2_small(root / "gpt2_small")
    data = Path(ensure_toy_data()) / "calibration.txt"
    store = Store.open(root / "large_store")
    (score,), score_s, score_cpu = _timed(
        run_score,
        store,
        ScoreConfig(
            model=ModelOptions(str(folder), "float32", "cpu", False),
            data=DataOptions(str(data), None, n_samples, 128, 4),
            seeds=[0],
            experiment="gpt2-small",
        ),
        mlflow=False,
    )
    rank, rank_s, _ = _timed(
        run_rank, store, RankConfig(score_run=score.run_id, topk=1000), mlflow=False
    )
    with store.read() as con:
        (weights,) = con.execute(
            "SELECT sum(numel) FROM tensor_stats WHERE run_id = ?", [score.run_id]
        ).fetchone()
    report, report_s, report_cpu = _timed(
        run_report, store, ReportConfig(runs=[rank.run_id]), mlflow=False
    )
    return {
        "weights": int(weights),
        "score_s": score_s,
        "score_cpu": score_cpu,
        "report_cpu": report_cpu,
        "rank_s": rank_s,
        "report_s": report_s,
        "figures": len(report.value["figures"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--limit", type=int, default=100, help="items per task in the study")
    parser.add_argument("--large-n-samples", type=int, default=8,
                        help="calibration sequences (x128 tokens) of the 124M score run")
    parser.add_argument("--skip-124m", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["CWA_MLFLOW"] = "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        root = Path(tmp)
        toy = toy_study(root, seeds, args.n_samples, args.limit)
        print(f"toy study ({toy['runs']} runs, whole chain {toy['chain_s']:.1f} s):")
        _ratio(f"score stage, {toy['score_runs']} seeds", toy["score_s"], toy["score_cpu"],
               f"report, {toy['figures']} figures x png+pdf+svg", toy["report_s"],
               toy["report_cpu"])
        print(f"  report with --formats png (warm): {toy['png_s']:.2f} s wall, "
              f"{toy['png_cpu']:.2f} s CPU; / score = {toy['png_s'] / toy['score_s']:.2f} wall, "
              f"{toy['png_cpu'] / toy['score_cpu']:.2f} CPU")
        if not args.skip_124m:
            big = large_score_run(root, args.large_n_samples)
            print(f"{big['weights']:,}-weight score run (rank top 1,000 took "
                  f"{big['rank_s']:.1f} s):")
            _ratio("score stage", big["score_s"], big["score_cpu"],
                   f"report, {big['figures']} figures x png+pdf+svg", big["report_s"],
                   big["report_cpu"])


def _ratio(what_a: str, wall_a: float, cpu_a: float, what_b: str, wall_b: float,
           cpu_b: float) -> None:
    print(f"  {what_a}: {wall_a:.2f} s wall, {cpu_a:.2f} s CPU")
    print(f"  {what_b}: {wall_b:.2f} s wall, {cpu_b:.2f} s CPU")
    print(f"  report / score = {wall_b / wall_a:.2f} wall, {cpu_b / cpu_a:.2f} CPU  (target < 1)")

if __name__ == "__main__":
    main()
