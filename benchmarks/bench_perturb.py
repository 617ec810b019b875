"""Benchmark: in-place perturb + exact restore vs the old design's ``copy.deepcopy`` of the model.

Model: a randomly initialised GPT-2 small (``GPT2Config()``, 124M parameters, float32, CPU; no
download). Selection: ``random_k`` of k = 100000 weights over every parameter tensor (so every
tensor is touched and every tensor's checksum is computed). Method: ``sign_flip``.

Variants, timed side by side in this run (median of ``--repeats``):

* ``cwa full``  — ``apply_perturbation`` + ``restore_exact`` as a single call would do it:
  checksum every touched tensor before, perturb, restore, checksum again and compare.
* ``cwa sweep`` — the same with ``baseline_checksums`` computed once for the sweep, i.e. the
  per-condition cost inside ``cwa perturb`` (one checksum pass per condition).
* ``in-place only`` — the bare index_select / index_copy_ work, no verification.
* ``deepcopy``  — the old design: ``copy.deepcopy(model)`` then perturb the copy with the same
  index operations (no verification, and it restores by discarding the copy).

Memory: torch's CPU allocations are invisible to ``tracemalloc``, so two figures are printed:
the exact bytes each design must hold (saved originals + their indices, vs every parameter
and buffer of the copy) and the peak resident-set growth measured by the kernel (``VmHWM``
after resetting it through ``/proc/self/clear_refs``), each variant in a fresh subprocess so
that memory freed by one variant cannot hide another's.

Run: ``python benchmarks/bench_perturb.py [--k 100000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build() -> tuple[object, object]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.perturbation.scope import scope_from_params
    from cwa.perturbation.selection import random_k

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    return model, random_k(scope_from_params(model), ARGS.k, seed=0)


def in_place_only(model, selection) -> None:
    import torch

    params = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, idx in selection.items():
            flat = params[name].detach().view(-1)
            saved[name] = flat.index_select(0, idx)
            flat.index_copy_(0, idx, -saved[name])
        for name, idx in selection.items():
            params[name].detach().view(-1).index_copy_(0, idx, saved[name])


def deepcopy_design(model, selection) -> None:
    import torch

    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, idx in selection.items():
            flat = params[name].detach().view(-1)
            flat.index_copy_(0, idx, -flat.index_select(0, idx))
    del clone


def run_variant(variant: str, model, selection, baseline) -> object:
    from cwa.perturbation.apply import apply_perturbation, restore_exact

    if variant == "cwa_full":
        handle = apply_perturbation(model, selection, "sign_flip")
        restore_exact(handle)
        return handle
    if variant == "cwa_sweep":
        handle = apply_perturbation(model, selection, "sign_flip", baseline_checksums=baseline)
        restore_exact(handle)
        return handle
    if variant == "in_place":
        return in_place_only(model, selection)
    return deepcopy_design(model, selection)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant: str) -> None:
    """Child process: peak RSS growth of one variant, printed as JSON."""
    from cwa.perturbation.checksum import named_checksums

    model, selection = build()
    baseline = named_checksums(model.named_parameters())
    # No warm-up run: memory a warm-up frees can stay in the process (glibc keeps freed heap
    # pages) and would hide the second run's growth. Each child measures one first run.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = rss_kib("VmRSS")
    run_variant(variant, model, selection, baseline)
    print(json.dumps({"peak_extra_bytes": (rss_kib("VmHWM") - before) * 1024}))


def main() -> None:
    import torch

    from cwa.perturbation.checksum import named_checksums

    model, selection = build()
    n_params = sum(p.numel() for p in model.parameters())
    copy_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    print(f"model: GPT-2 small, {n_params:,} parameters, {copy_bytes / 2**20:.0f} MiB float32")
    print(
        f"selection: random_k k={selection.k:,} over {len(selection)} tensors; torch threads "
        f"{torch.get_num_threads()}"
    )

    start = time.perf_counter()
    baseline = named_checksums(model.named_parameters())
    checksum_s = time.perf_counter() - start
    print(f"one checksum pass over the touched tensors (sha256): {checksum_s:.3f} s")

    variants = ["cwa_full", "cwa_sweep", "in_place", "deepcopy"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    handle = None
    for _ in range(ARGS.repeats):
        for variant in variants:  # interleaved so that machine noise hits all alike
            start = time.perf_counter()
            result = run_variant(variant, model, selection, baseline)
            times[variant].append(time.perf_counter() - start)
            if variant == "cwa_full":
                handle = result
    assert handle is not None and handle.n_changed == selection.k and handle.restored
    median = {v: statistics.median(t) for v, t in times.items()}

    memory = {}
    for variant in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--k", str(ARGS.k), "--measure", variant],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]

    print(f"\n{'variant':<14}{'time (s)':>10}{'/ deepcopy':>12}{'peak RSS +MiB':>15}")
    for variant in variants:
        print(
            f"{variant:<14}{median[variant]:>10.3f}{median[variant] / median['deepcopy']:>12.3f}"
            f"{memory[variant] / 2**20:>15.1f}"
        )
    saved = handle.saved_bytes
    print(
        f"\nheld to undo: cwa {saved / 2**20:.2f} MiB (k originals + int64 indices) vs deepcopy "
        f"{copy_bytes / 2**20:.1f} MiB (parameters + buffers): ratio {saved / copy_bytes:.4f}"
    )
    print(
        f"peak RSS ratio cwa_sweep / deepcopy: {memory['cwa_sweep'] / memory['deepcopy']:.4f}; "
        f"cwa_full / deepcopy: {memory['cwa_full'] / memory['deepcopy']:.4f}"
    )
    print(
        f"time ratio cwa_sweep / deepcopy: {median['cwa_sweep'] / median['deepcopy']:.3f}; "
        f"cwa_full / deepcopy: {median['cwa_full'] / median['deepcopy']:.3f}; "
        f"in_place / deepcopy: {median['in_place'] / median['deepcopy']:.4f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", choices=["cwa_full", "cwa_sweep", "in_place", "deepcopy"])
    ARGS = parser.parse_args()
    if ARGS.measure:
        measure_memory(ARGS.measure)
    else:
        main()
