"""Does reporting dominate a run? Report time / score-stage time, measured side by side.

Two stores, each built and reported on in this one run:

1. a full study of the toy model: ``cwa run`` with every analysis switch (one score run per
   seed, k-curve, clustered perturbation, downstream tasks, profile, clusters, correlation,
   stability, effects), then ``cwa report`` over the whole experiment;
2. a 124M-weight score run: a GPT-2-small-shaped model (124,439,808 weights, randomly
   initialised, saved locally with the toy tokenizer, since tests and benchmarks are offline)
   scored with grad_x_weight by the real score stage (score file written tensor by tensor, per
   tensor statistics), ranked (top 1,000), then reported.

Printed: each stage's wall and CPU time and the ratios report / score (target < 1), each the
median of ``--repeats`` runs, score and report interleaved so both see the same machine load;
CPU time is the fairer measure on a shared machine. The toy study's score stage (all seeds) is
timed again here: its first repeat joins the study (so the report shows the same 15 runs as
before), later repeats go to a separate experiment so every report repeat shows the same runs.
Each report runs cold in a fresh process, as ``cwa report`` does (matplotlib imported and fonts
subset inside the timed call), in PNG + PDF + SVG (the default) and PNG only, MLflow off; the
time is measured inside that process around ``run_report`` (interpreter start not counted).

    python benchmarks/bench_report.py [--skip-124m] [--seeds 0,1,2] [--n-samples 32] \
        [--limit 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_COLD_REPORT = """
import json, sys, time
from cwa.stages.report import ReportConfig, run_report
from cwa.store import Store
store = Store.open(sys.argv[1])
config = ReportConfig(**json.loads(sys.argv[2]))
start, cpu = time.perf_counter(), time.process_time()
outcome = run_report(store, config, mlflow=False)
import cwa
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "figures": len(outcome.value["figures"]), "runs": len(outcome.value["runs"]),
                  "cwa": cwa.__file__}))
"""


def cold_report(store_path: Path, src: str | None = None, **config: object) -> dict[str, float]:
    """One report in a fresh interpreter (as the CLI runs it); its wall and CPU seconds.

    ``src``: run it with another cwa source tree first on the path (a baseline version).
    """
    env = {**os.environ, "CWA_MLFLOW": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _COLD_REPORT, str(store_path), json.dumps(config)],
        check=True, capture_output=True, text=True, env=env,
        cwd=store_path.parent,  # not the checkout: `python -c` puts the cwd first on sys.path
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def _timed(fn, *args, **kwargs):
    """(value, wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start, time.process_time() - cpu


def toy_study(
    root: Path, seeds: list[int], n_samples: int, limit: int, repeats: int,
    baseline: str | None = None,
) -> dict:
    from cwa.stages.common import ModelOptions
    from cwa.stages.pipeline import PipelineConfig, run_pipeline
    from cwa.stages.pipeline_analysis import AnalysisSwitches
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
    from cwa.models.loading import load_model
    from cwa.stages.score import ScoreConfig, run_score

    loaded = load_model("toy", dtype="float32", device="cpu")
    scores, full, png, base = [], [], [], []
    for repeat in range(repeats):
        # The study's score stage once more (all seeds), then the two reports, interleaved.
        label = "toy-study" if repeat == 0 else "toy-study-rescore"
        runs, score_s, score_cpu = _timed(
            run_score,
            store,
            ScoreConfig(model=config.model, data=config.data, seeds=seeds, experiment=label),
            mlflow=False,
            loaded=loaded,
        )
        scores.append({"wall": score_s, "cpu": score_cpu, "runs": len(runs)})
        full.append(cold_report(root / "toy_store", experiment="toy-study"))
        png.append(cold_report(root / "toy_store", experiment="toy-study", formats=["png"]))
        if baseline is not None:
            base.append(cold_report(root / "toy_store", baseline, experiment="toy-study"))
    return {
        "chain_s": chain_s,
        "score_runs": scores[0]["runs"],
        "score_s": _median(scores, "wall"),
        "score_cpu": _median(scores, "cpu"),
        "report_s": _median(full, "wall"),
        "report_cpu": _median(full, "cpu"),
        "png_s": _median(png, "wall"),
        "png_cpu": _median(png, "cpu"),
        "figures": full[0]["figures"],
        "runs": full[0]["runs"],
        "base_s": _median(base, "wall") if base else None,
        "base_cpu": _median(base, "cpu") if base else None,
        "samples": {"score": scores, "report": full, "png": png, "baseline": base},
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


def large_score_run(root: Path, n_samples: int, repeats: int) -> dict[str, float]:
    from cwa.stages.common import ModelOptions
    from cwa.stages.rank import RankConfig, run_rank
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
    reports = [cold_report(root / "large_store", runs=[rank.run_id]) for _ in range(repeats)]
    return {
        "weights": int(weights),
        "score_s": score_s,
        "score_cpu": score_cpu,
        "report_cpu": _median(reports, "cpu"),
        "rank_s": rank_s,
        "report_s": _median(reports, "wall"),
        "figures": reports[0]["figures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--limit", type=int, default=100, help="items per task in the study")
    parser.add_argument("--large-n-samples", type=int, default=8,
                        help="calibration sequences (x128 tokens) of the 124M score run")
    parser.add_argument("--skip-124m", action="store_true")
    parser.add_argument("--baseline-src", default=None,
                        help="a directory holding another cwa source tree (e.g. from `git "
                        "archive`): its report is timed too, interleaved, for before/after")
    parser.add_argument("--repeats", type=int, default=3,
                        help="medians over this many score/report repeats (the 124M score "
                        "run is timed once, its report --repeats times)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["CWA_MLFLOW"] = "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        root = Path(tmp)
        toy = toy_study(root, seeds, args.n_samples, args.limit, args.repeats,
                        args.baseline_src)
        print(f"report code: {toy['samples']['report'][0]['cwa']}")
        print(f"toy study ({toy['runs']} runs, whole chain {toy['chain_s']:.1f} s), "
              f"medians of {args.repeats} repeats, reports cold in a fresh process:")
        _ratio(f"score stage, {toy['score_runs']} seeds", toy["score_s"], toy["score_cpu"],
               f"report, {toy['figures']} figures x png+pdf+svg", toy["report_s"],
               toy["report_cpu"])
        print(f"  report with --formats png: {toy['png_s']:.2f} s wall, "
              f"{toy['png_cpu']:.2f} s CPU; / score = {toy['png_s'] / toy['score_s']:.2f} wall, "
              f"{toy['png_cpu'] / toy['score_cpu']:.2f} CPU")
        if toy["base_s"] is not None:
            print(f"  baseline report ({toy['samples']['baseline'][0]['cwa']}), png+pdf+svg: "
                  f"{toy['base_s']:.2f} s "
                  f"wall, {toy['base_cpu']:.2f} s CPU; / score = "
                  f"{toy['base_s'] / toy['score_s']:.2f} wall, "
                  f"{toy['base_cpu'] / toy['score_cpu']:.2f} CPU")
        for name, samples in toy["samples"].items():
            if not samples:
                continue
            print(f"  {name} repeats (wall/CPU s): "
                  + ", ".join(f"{x['wall']:.2f}/{x['cpu']:.2f}" for x in samples))
        if not args.skip_124m:
            big = large_score_run(root, args.large_n_samples, args.repeats)
            print(f"{big['weights']:,}-weight score run (report: median of {args.repeats}; "
                  f"rank top 1,000 took "
                  f"{big['rank_s']:.1f} s):")
            _ratio("score stage (once)", big["score_s"], big["score_cpu"],
                   f"report, {big['figures']} figures x png+pdf+svg", big["report_s"],
                   big["report_cpu"])


def _ratio(what_a: str, wall_a: float, cpu_a: float, what_b: str, wall_b: float,
           cpu_b: float) -> None:
    print(f"  {what_a}: {wall_a:.2f} s wall, {cpu_a:.2f} s CPU")
    print(f"  {what_b}: {wall_b:.2f} s wall, {cpu_b:.2f} s CPU")
    print(f"  report / score = {wall_b / wall_a:.2f} wall, {cpu_b / cpu_a:.2f} CPU  (target < 1)")

if __name__ == "__main__":
    main()
