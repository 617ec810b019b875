"""Benchmark: ``grad_x_weight`` scoring vs a bare forward+backward loop on the same batches.

Model: a randomly initialised GPT-2 small (``GPT2Config()``: 12 layers, width 768, 124M
parameters, float32, CPU; no download). Batches: random token ids, the last row of every batch
right-padded by a quarter of its length (padding is masked in both loops).

Throughput (median of ``--repeats``, the two loops alternated so machine noise hits both):

* ``bare``: ``model(input_ids, attention_mask, labels).loss.backward()`` per batch, eval mode.
* ``bare_cwa_loss``: the same loop computing the loss with cwa's own code (labels aligned with
  the logits instead of HF's shifted copy), to separate the metric's overhead from the loss
  code's.
* ``scoring``: :func:`cwa.metrics.score_model` with ``grad_x_weight`` writing a score file:
  the batch loop, then |w * grad| per tensor, statistics and the streamed safetensors write.
  Printed twice: the batch loop alone (from the progress reporter's task timings) and end to
  end. The end-to-end ratio depends on the calibration size because the per-tensor work is a
  fixed cost (~124M elements sorted once for exact quantiles and written once).

Peak memory: torch's CPU allocations are invisible to ``tracemalloc``, so the kernel's
resident-set high-water mark is used: each variant runs in a fresh subprocess that builds the
model and batches, resets ``VmHWM`` through ``/proc/self/clear_refs``, runs one pass and reads
``VmHWM`` from ``/proc/self/status``. Printed: the peak RSS of each (model, runtime and all) and
the growth above the pre-pass RSS.

Run: ``python benchmarks/bench_scoring.py [--quick] [--threads 1]``. On a shared machine use
one thread (oversubscribed OpenMP threads make timings erratic) and compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _proc_memory import reset_peak_rss, status_kib, trim_heap

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 batches of 2 x 128 tokens")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--child", choices=["bare", "bare_cwa_loss", "score"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    quick = {"batches": 3, "batch_size": 2, "seq_len": 128, "repeats": 2}
    full = {"batches": 8, "batch_size": 4, "seq_len": 256, "repeats": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build(args: argparse.Namespace):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.models.architecture import build_architecture_map

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, args.seq_len - args.seq_len // 4 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, build_architecture_map(model), batches


def bare_loop(model, batches) -> None:
    """The plain Hugging Face loop: loss from ``labels``, backward per batch."""
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def bare_loop_cwa_loss(model, batches) -> None:
    """The same loop with cwa's loss code (isolates the metric's own overhead)."""
    from cwa.metrics.base import count_targets, token_nll

    n_targets, _ = count_targets(batches)
    for batch in batches:
        nll, _ = token_nll(model, batch, next(model.parameters()).device)
        (nll.sum() / n_targets).backward()
    model.zero_grad(set_to_none=True)


BARE_LOOPS = {"bare": bare_loop, "bare_cwa_loss": bare_loop_cwa_loss}


class TimingReporter:
    """A progress reporter that records when each task was opened and closed."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    def task(self, description: str, total: int | None = None):
        reporter, start = self, time.perf_counter()

        class Handle:
            def advance(self, n: int = 1) -> None:
                pass

            def close(self) -> None:
                reporter.spans[description] = time.perf_counter() - start

        return Handle()

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


def score_once(model, arch, batches, out_dir: str) -> tuple[float, float]:
    """(end-to-end seconds, batch-loop seconds) of one grad_x_weight scoring pass."""
    from cwa.metrics import score_model

    reporter = TimingReporter()
    path = os.path.join(out_dir, "scores.safetensors")
    start = time.perf_counter()
    score_model(model, batches, "grad_x_weight", arch=arch, out_path=path, reporter=reporter)
    total = time.perf_counter() - start
    os.unlink(path)
    return total, reporter.spans["grad_x_weight: batches"]


def child(args: argparse.Namespace) -> None:
    model, arch, batches = build(args)
    with tempfile.TemporaryDirectory() as out_dir:
        trim_heap()
        before = status_kib("VmRSS")
        reset_peak_rss()
        if args.child in BARE_LOOPS:
            BARE_LOOPS[args.child](model, batches)
        else:
            score_once(model, arch, batches, out_dir)
        peak = status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    results = {}
    for variant in ("bare", "bare_cwa_loss", "score"):
        command = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--threads",
            str(args.threads),
            "--batches",
            str(args.batches),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    model, arch, batches = build(args)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 small (random init), {n_params / 1e6:.1f}M parameters, {args.batches} batches x "
        f"{args.batch_size} x {args.seq_len} tokens ({tokens} real), {args.threads} thread(s)"
    )
    bare_loop(model, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"bare": [], "bare_cwa_loss": [], "score": [], "loop": []}
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.repeats):
            for label, loop_fn in BARE_LOOPS.items():
                start = time.perf_counter()
                loop_fn(model, batches)
                times[label].append(time.perf_counter() - start)
            total, loop = score_once(model, arch, batches, out_dir)
            times["score"].append(total)
            times["loop"].append(loop)
    median = {label: statistics.median(runs) for label, runs in times.items()}

    def runs(label: str) -> str:
        return ", ".join(f"{t:.2f}" for t in times[label])

    names = {
        "bare": "bare fwd+bwd (HF labels loss)",
        "bare_cwa_loss": "bare fwd+bwd (cwa loss code)",
        "score": "grad_x_weight scoring",
        "loop": "  of which the batch loop",
    }
    for label, name in names.items():
        print(f"{name:30s}: median {median[label]:7.2f} s  runs {runs(label)}")
    print(f"per-tensor scores+stats+file  : {median['score'] - median['loop']:.2f} s (fixed cost)")
    for label in BARE_LOOPS:
        print(
            f"throughput ratio vs {label:13s}: batch loop {median[label] / median['loop']:.3f}"
            f" (target >= 0.9), end to end {median[label] / median['score']:.3f}"
        )

    memory = measure_memory(args)
    for label in BARE_LOOPS:
        base, ours = memory[label], memory["score"]
        growth_base = base["peak_kib"] - base["before_kib"]
        growth_ours = ours["peak_kib"] - ours["before_kib"]
        print(
            f"peak RSS vs {label:13s}: {base['peak_kib'] / 2**20:.2f} GiB -> scoring "
            f"{ours['peak_kib'] / 2**20:.2f} GiB, ratio {ours['peak_kib'] / base['peak_kib']:.3f}"
            f" (target <= 1.25); growth above pre-pass RSS {growth_base / 2**20:.2f} -> "
            f"{growth_ours / 2**20:.2f} GiB, ratio {growth_ours / max(growth_base, 1):.3f}"
        )


if __name__ == "__main__":
    main()
