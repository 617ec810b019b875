"""Benchmark: ``cwa analyze`` on a GPT-2-small-sized score run vs reading its score file once.

Two synthetic score runs of GPT-2 small (``GPT2Config()``: 124,439,808 weights in 148 tensors;
log-normal random scores, written tensor by tensor with :class:`cwa.scorefile.ScoreFileWriter`)
are registered in a temporary store; the architecture map comes from the config on the
``meta`` device. Timed side by side in this process, page cache warm, median of ``--repeats``:

* ``read once``: open the score file, load every tensor (``safe_open(...).get_tensor``) and sum
  it (torch, one pass): the unavoidable cost of looking at every score once;
* ``profile``: the analyzer's computation (``spec.run``) and the whole ``run_analyze`` stage
  (validation, registration, computation, one write transaction);
* ``stability``: two runs, k list ``100,1000,10000,0.1%``, global + layer + component groups,
  against reading both files once.

Ratios = analyzer time / read time (the issue's target: at most about 2x). Memory: the peak
growth of anonymous resident memory during the analyzer (:class:`AnonPeak`) next to the
largest score tensor (O(largest tensor + k) is the design).

Run: ``python benchmarks/bench_analyze.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CWA_MLFLOW", "0")

from _proc_memory import status_kib, trim_heap  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k-values", default="100,1000,10000,0.1%")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


class AnonPeak:
    """Peak growth of anonymous resident memory (``RssAnon``) while in the ``with`` block.

    ``VmHWM`` would also count the score file's pages that safetensors maps into the process
    (clean page cache, released under pressure), so it overstates what the analyzer holds;
    anonymous memory is what it allocates. Sampled every 2 ms by a thread.
    """

    def __enter__(self) -> AnonPeak:
        trim_heap()
        self.baseline = status_kib("RssAnon")
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


def _shapes() -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GPT2Config())
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def make_score_run(store, model_dir: Path, shapes: dict, seed: int) -> str:
    """A succeeded score run holding random log-normal scores (written tensor by tensor)."""
    import torch

    from cwa.lifecycle import StageOutput, StageRequest, execute_stage
    from cwa.scorefile import ScoreFileWriter

    ref = str(model_dir)
    request = StageRequest(
        stage="score",
        config={"metric": "random", "seed": seed, "model": {"ref": ref}},
        experiment="bench",
        model_ref=ref,
        seed=seed,
    )

    def compute(ctx):
        gen = torch.Generator().manual_seed(seed)
        path = ctx.artifact_path("scores.safetensors", kind="scores")
        with ScoreFileWriter(path, list(shapes.items())) as writer:
            for name, shape in shapes.items():
                writer.write(name, torch.exp(torch.randn(shape, generator=gen) * 2.0))
        ctx.set_model(ref, "bench-gpt2-small", "cpu")
        return StageOutput()

    return execute_stage(store, request, compute, mlflow=False).run_id


def read_once(path: Path) -> float:
    from safetensors import safe_open

    start = time.perf_counter()
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            # get_tensor maps the file lazily: summing touches every score once (the least
            # any analysis must do), so the bytes are really read
            float(handle.get_tensor(name).sum())
    return time.perf_counter() - start


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_one(store, name: str, runs: list[str], options: dict, paths: list, args) -> dict:
    """Read time, compute and stage times and their ratios (medians over repeats), peak MiB.

    Each repeat reads the input score files once (the baseline) right before the analyzer
    runs, so both see the same load on a shared machine; the ratio is taken per repeat and
    its median reported. A first, untimed call of the analyzer (one-time imports such as
    scipy.stats, page cache) is the one whose memory is measured.
    """
    from cwa.progress import NULL_REPORTER
    from cwa.stages.analyze import AnalyzeConfig, prepare_analysis, run_analyze

    config = AnalyzeConfig(name, runs=runs, options=options)
    spec, inputs, parsed = prepare_analysis(store, config)
    inputs.architecture(inputs.runs[0])  # built once per model (meta device)
    with AnonPeak() as memory:
        spec.run(inputs, parsed, NULL_REPORTER)
    rows = []
    for _ in range(args.repeats):
        t_read = sum(read_once(p) for p in paths)
        t_compute = _timed(lambda: spec.run(inputs, parsed, NULL_REPORTER))
        t_read_2 = sum(read_once(p) for p in paths)
        t_stage = _timed(lambda: run_analyze(store, config, mlflow=False))
        rows.append((t_read, t_compute, t_compute / t_read, t_read_2, t_stage, t_stage / t_read_2))
    med = [statistics.median(column) for column in zip(*rows, strict=True)]
    return {
        "read": med[0],
        "compute": med[1],
        "compute_ratio": med[2],
        "stage": med[4],
        "stage_ratio": med[5],
        "ratios": [round(r[2], 2) for r in rows],
        "peak": memory.growth_mib,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import GPT2Config

    from cwa.store import Store

    shapes = _shapes()
    n_weights = sum(int(torch.Size(s).numel()) for s in shapes.values())
    largest = max(int(torch.Size(s).numel()) for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="cwa_bench_analyze_") as tmp:
        model_dir = Path(tmp) / "gpt2-small-config"
        GPT2Config().save_pretrained(model_dir)
        store = Store.open(Path(tmp) / "store")
        print(f"writing two score runs of {n_weights:,} weights ({len(shapes)} tensors) ...")
        ids = [make_score_run(store, model_dir, shapes, seed) for seed in (0, 1)]
        paths = [store.artifacts_dir(i) / "scores.safetensors" for i in ids]
        for path in paths:
            read_once(path)  # warm the page cache
        results = [
            (
                "profile",
                _bench_one(store, "profile", ids[:1], {"rank_run": "none"}, paths[:1], args),
            ),
            (
                "stability",
                _bench_one(store, "stability", ids, {"k_values": args.k_values}, paths, args),
            ),
        ]
        print(f"\nthreads {torch.get_num_threads()}, {args.repeats} repeats (medians)")
        print(f"largest tensor: {largest:,} scores = {largest * 4 / 2**20:.0f} MiB float32")
        header = (
            f"{'analyzer':<10} {'read s':>7} {'compute s':>10} {'compute/read':>13} "
            f"{'stage s':>8} {'stage/read':>11} {'peak MiB':>9}  per-repeat compute/read"
        )
        print(header)
        for name, r in results:
            print(
                f"{name:<10} {r['read']:>7.3f} {r['compute']:>10.3f} {r['compute_ratio']:>12.2f}x "
                f"{r['stage']:>8.3f} {r['stage_ratio']:>10.2f}x {r['peak']:>9.0f}  {r['ratios']}"
            )
        print(
            "\nread = one pass over the input score file(s) (profile: one file, stability: both); "
            "peak = anonymous resident memory growth during one analyzer computation; compare "
            f"with the largest tensor ({largest * 4 / 2**20:.0f} MiB per run held) and the whole "
            f"file ({n_weights * 4 / 2**20:.0f} MiB per run)."
        )


if __name__ == "__main__":
    main()
