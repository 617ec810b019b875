"""Pruning-scale selection (k = 50% of a 124M-weight model) vs one sort of every score.

Writes a synthetic float32 score file with GPT-2-small tensor shapes (124.4M weights, random
scores with ties), then side by side in one process:

* ``sort``: the scores concatenated and sorted once with numpy (the lower bound of any
  approach that sorts; the concatenation is not timed; the faster of two runs);
* ``select``: :func:`cwa.ranking_store.select_k` at k = 50% by |score| -- exact global
  top-k streamed from the file, written as a compact artifact (``--per global``);
* ``per tensor`` / ``per row``: :func:`cwa.ranking_groups.select_grouped`, 50% of each tensor
  (radix select per tensor) and 50% of each output row (row partition; the 2-D weights only,
  Conv1D ``[in, out]`` rows along the last axis, embeddings along the first: 124.3M of the
  124.4M weights; the 1-D biases and norms have no rows).

Prints per mode the time ratio to the sort (target <= 2), the peak traced memory of the
selection (numpy allocations, ``tracemalloc``) in bytes per selected weight and the artifact
size per selected weight (target: a few bytes).

    python benchmarks/bench_rank_fraction.py [--fraction 50%] [--scale 1.0]
        [--per global,tensor,row]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

GPT2_SMALL = (
    [("wte", (50257, 768)), ("wpe", (1024, 768))]
    + [
        (f"h.{i}.{part}", shape)
        for i in range(12)
        for part, shape in (
            ("ln_1.weight", (768,)), ("ln_1.bias", (768,)),
            ("attn.c_attn.weight", (768, 2304)), ("attn.c_attn.bias", (2304,)),
            ("attn.c_proj.weight", (768, 768)), ("attn.c_proj.bias", (768,)),
            ("ln_2.weight", (768,)), ("ln_2.bias", (768,)),
            ("mlp.c_fc.weight", (768, 3072)), ("mlp.c_fc.bias", (3072,)),
            ("mlp.c_proj.weight", (3072, 768)), ("mlp.c_proj.bias", (768,)),
        )
    ]
    + [("ln_f.weight", (768,)), ("ln_f.bias", (768,))]
)  # fmt: skip


def _write(path: Path, scale: float) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    import torch

    from cwa.scorefile import ScoreFileWriter

    rng = np.random.default_rng(0)
    shapes = [(n, tuple(max(1, int(d * scale)) if i == 0 else d for i, d in enumerate(s)))
              for n, s in GPT2_SMALL]  # fmt: skip
    total = 0
    with ScoreFileWriter(path, shapes, "float32", {}) as writer:
        for name, shape in shapes:
            # Rounded to 1e-4: many exact ties, as real bf16 / low-precision scores have.
            values = np.round(rng.standard_normal(shape, dtype=np.float32), 4)
            writer.write(name, torch.from_numpy(values))
            total += values.size
    return total, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", default="50%")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the model for a quick run")
    parser.add_argument("--per", default="global,tensor,row", help="comparison groups to time")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from cwa.ranking_groups import select_grouped
    from cwa.ranking_store import iter_selection, select_k
    from cwa.scorefile import open_scores

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.safetensors"
        n, shapes = _write(path, args.scale)
        # Output axis of the 2-D tensors: GPT-2's Conv1D weights are [in, out]; wte/wpe rows.
        axes = {name: 0 if name in ("wte", "wpe") else 1 for name, shape in shapes
                if len(shape) == 2}  # fmt: skip
        with open_scores(path) as reader:
            everything = np.concatenate([reader.get(x).numpy().reshape(-1) for x in reader.names()])
        sort_seconds = float("inf")
        for _ in range(2):  # the faster of two sorts: on a shared machine, a conservative ratio
            start = time.perf_counter()
            np.sort(np.abs(everything))
            sort_seconds = min(sort_seconds, time.perf_counter() - start)
        del everything

        results = []
        for per in args.per.split(","):
            out = Path(tmp) / f"selection-{per}.bin"
            tracemalloc.start()
            start = time.perf_counter()
            if per == "global":
                summary = select_k(path, args.fraction, out, by="abs")
            else:
                names = [n for n, shape in shapes if len(shape) == 2] if per == "row" else None
                summary = select_grouped(path, args.fraction, out, per=per, by="abs",
                                         names=names, axes=axes)  # fmt: skip
            seconds = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            streamed = sum(idx.size for _, idx in iter_selection(out))
            results.append((per, summary, seconds, peak, streamed))
    print(f"{n / 1e6:.1f}M weights, k = {args.fraction} (exact, by |score|)")
    print(f"{'one numpy sort of all scores':34}{sort_seconds:>8.2f} s")
    for per, summary, seconds, peak, streamed in results:
        k = summary.k
        print(f"--per {per}: k = {k / 1e6:.2f}M of {summary.n_candidates / 1e6:.2f}M")
        print(f"  {'time':32}{seconds:>8.2f} s")
        print(f"  {'time ratio to the sort':32}{seconds / sort_seconds:>8.2f}   (target <= 2)")
        print(f"  {'peak traced memory / selected':32}{peak / k:>8.2f} bytes per weight")
        size = summary.bytes_written / k
        print(f"  {'artifact size / selected':32}{size:>8.2f} bytes per weight")
        print(f"  {'streamed back':32}{streamed:>8d} weights (== k: {streamed == k})")


if __name__ == "__main__":
    main()
