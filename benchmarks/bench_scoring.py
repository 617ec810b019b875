"""Benchmark: ``grad_x_weight`` scoring vs a bare forward+backward loop on the same batches.

Model: a randomly initialised GPT-2 small (``GPT2Config()``: 12 layers, width 768, 124M
parameters, float32, CPU; no download). Batches: random token ids, the last row of every batch
right-padded by a quarter of its length (padding is masked in both loops).

Throughput (median of ``--repeats``, the two loops alternated so machine noise hits both):

* ``bare``: ``model(input_ids, attention_mask, labels).loss.backward()`` per batch, eval mode.
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
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 batches of 2 x 128 tokens")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["bare", "score"], help=argparse.SUPPRESS)
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
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        out.loss.backward()
    model.zero_grad(set_to_none=True)


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


def _trim() -> None:
    import gc

    gc.collect()
    try:  # give freed heap pages back so they do not pad the next measurement
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    model, arch, batches = build(args)
    with tempfile.TemporaryDirectory() as out_dir:
        _trim()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        if args.child == "bare":
            bare_loop(model, batches)
        else:
            score_once(model, arch, batches, out_dir)
        peak = _status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    results = {}
    for variant in ("bare", "score"):
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
    bare_times, score_times, loop_times = [], [], []
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare_loop(model, batches)
            bare_times.append(time.perf_counter() - start)
            total, loop = score_once(model, arch, batches, out_dir)
            score_times.append(total)
            loop_times.append(loop)
    bare, score, loop = (statistics.median(x) for x in (bare_times, score_times, loop_times))
    fmt = ", ".join
    print(
        f"bare forward+backward : median {bare:7.2f} s  runs {fmt(f'{t:.2f}' for t in bare_times)}"
    )
    print(
        f"grad_x_weight scoring : median {score:7.2f} s  runs "
        f"{fmt(f'{t:.2f}' for t in score_times)}"
    )
    print(
        f"  of which batch loop : median {loop:7.2f} s; "
        f"per-tensor scores+stats+file {score - loop:.2f} s"
    )
    print(
        "throughput ratio, batch loop  (bare time / scoring loop time): "
        f"{bare / loop:.3f}  (target >= 0.9)"
    )
    print(f"throughput ratio, end to end  (bare time / scoring time)     : {bare / score:.3f}")

    memory = measure_memory(args)
    bare_mem, score_mem = memory["bare"], memory["score"]
    print(
        f"peak RSS: bare {bare_mem['peak_kib'] / 2**20:.2f} GiB, scoring "
        f"{score_mem['peak_kib'] / 2**20:.2f} GiB; ratio "
        f"{score_mem['peak_kib'] / bare_mem['peak_kib']:.3f}  (target <= 1.25)"
    )
    growth_bare = bare_mem["peak_kib"] - bare_mem["before_kib"]
    growth_score = score_mem["peak_kib"] - score_mem["before_kib"]
    print(
        f"peak growth above the pre-pass RSS: bare {growth_bare / 2**20:.2f} GiB, scoring "
        f"{growth_score / 2**20:.2f} GiB; ratio {growth_score / max(growth_bare, 1):.3f}"
    )


if __name__ == "__main__":
    main()
