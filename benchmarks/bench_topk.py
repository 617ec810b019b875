"""Benchmark: streaming global top-k over all 124M GPT-2 scores vs ``torch.cat`` + ``topk``.

Scores: uniform random float32, one tensor per parameter of GPT-2 small (``GPT2Config()``,
124,439,808 weights in 148 tensors); the architecture map is built from a model on the ``meta``
device, so no weights are allocated. Timed side by side in this run, median of ``--repeats``:

* ``cwa in memory``: :func:`cwa.ranking.rank_tensors` (mode ``global``) over the in-memory
  tensors: exact tie order and full output rows (parameter, flat index, row, column, layer,
  component, head, score).
* ``reference in memory``: ``torch.topk(torch.cat([all scores flattened]), k)`` (values and flat
  positions only; ties in arbitrary order).
* ``cwa from file``: :func:`cwa.ranking.rank_scores` reading the score file tensor by tensor
  (page cache warm).
* ``reference from file``: load every tensor of the file, then cat + topk.
* ``python loop`` (the old design): a per-weight loop (``tensor[i].item()`` into a heap of size
  k) timed on ``--loop-sample`` weights and extrapolated to all 124M.

Memory: the running top-k state is exact (bytes of its arrays: O(k)). The temporaries are shown
as the peak resident-set growth during the call (``VmHWM`` reset through
``/proc/self/clear_refs`` just before; score tensors are already resident, heap trimmed first).

Run: ``python benchmarks/bench_topk.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import heapq
import os
import statistics
import tempfile
import time

from _proc_memory import reset_peak_rss, status_kib, trim_heap

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, smaller loop sample")
    parser.add_argument("--ks", default="1000,100000")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--loop-sample", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.loop_sample is None:
        args.loop_sample = 20_000 if args.quick else 200_000
    return args


def peak_growth(fn, *fn_args):
    """(result, seconds, peak RSS growth in bytes) of one call."""
    trim_heap()
    before = status_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    result = fn(*fn_args)
    seconds = time.perf_counter() - start
    return result, seconds, (status_kib("VmHWM") - before) * 1024


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.models.architecture import build_architecture_map
    from cwa.ranking import RunningTopK, rank_scores, rank_tensors
    from cwa.scorefile import load_scores, write_score_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.device("meta"):
        skeleton = GPT2LMHeadModel(GPT2Config())
    arch = build_architecture_map(skeleton)
    generator = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(info.shape, generator=generator) for n, info in arch.params.items()}
    total = sum(t.numel() for t in scores.values())
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "scores.safetensors")
    write_score_file(path, scores)
    print(
        f"{total:,} scores in {len(scores)} tensors (GPT-2 small shapes), float32; "
        f"{args.threads} thread(s)"
    )

    def cwa_memory(k: int):
        return rank_tensors(scores.items(), arch, k=k, mode="global")

    def reference_memory(k: int):
        return torch.topk(torch.cat([t.reshape(-1) for t in scores.values()]), k)

    def cwa_file(k: int):
        return rank_scores(path, arch, k=k, mode="global")

    def reference_file(k: int):
        loaded = load_scores(path)
        return torch.topk(torch.cat([t.reshape(-1) for t in loaded.values()]), k)

    def selection_only(k: int) -> RunningTopK:
        top = RunningTopK(k)
        for position, tensor in enumerate(scores.values()):
            top.offer(position, tensor.numpy().reshape(-1))
        return top

    for k in [int(x) for x in args.ks.split(",")]:
        results: dict[str, list[tuple[float, int]]] = {}
        for _ in range(args.repeats):
            for label, fn in (
                ("cwa in memory", cwa_memory),
                ("reference in memory", reference_memory),
                ("cwa from file", cwa_file),
                ("reference from file", reference_file),
            ):
                output, seconds, growth = peak_growth(fn, k)
                results.setdefault(label, []).append((seconds, growth))
                del output
        _, select_seconds, _ = peak_growth(selection_only, k)
        state = selection_only(k)
        ours = cwa_memory(k)
        reference = reference_memory(k)
        # Same set of values (ties aside, uniform floats make the sets equal).
        assert sorted(r["score"] for r in ours) == sorted(reference.values.tolist())
        median = {label: statistics.median(s for s, _ in runs) for label, runs in results.items()}
        growth = {label: max(g for _, g in runs) for label, runs in results.items()}
        print(f"\nk = {k:,}")
        for label in results:
            print(
                f"  {label:20s}: median {median[label]:6.2f} s   peak RSS growth "
                f"{growth[label] / 2**20:8.1f} MiB"
            )
        print(f"  cwa selection only (no output rows): {select_seconds:.2f} s")
        print(
            f"  ratio cwa / reference, in memory : "
            f"{median['cwa in memory'] / median['reference in memory']:.3f}  (target <= 1.5)"
        )
        print(
            f"  ratio cwa / reference, from file : "
            f"{median['cwa from file'] / median['reference from file']:.3f}"
        )
        print(f"  running top-k state: {state.nbytes():,} bytes ({state.nbytes() / k:.0f} per k)")

    # The old design: a Python loop over weights, timed on a sample and extrapolated.
    flat = next(iter(scores.values())).reshape(-1)
    k = 1000
    heap: list[tuple[float, int]] = []
    start = time.perf_counter()
    for i in range(args.loop_sample):
        item = (flat[i].item(), i)
        if len(heap) < k:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)
    per_weight = (time.perf_counter() - start) / args.loop_sample
    loop_total = per_weight * total
    _, cwa_seconds, _ = peak_growth(cwa_memory, k)
    print(
        f"\npython loop (old design): {per_weight * 1e6:.2f} us per weight on {args.loop_sample:,} "
        f"weights -> {loop_total:.0f} s for all {total:,} (extrapolated); "
        f"cwa k=1000 in memory {cwa_seconds:.2f} s: speed-up {loop_total / cwa_seconds:.0f}x"
    )
    os.unlink(path)
    os.rmdir(workdir)


if __name__ == "__main__":
    main()
