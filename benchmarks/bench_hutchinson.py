"""Benchmark: one Hutchinson probe vs one plain Hessian-vector product, and vs per-tensor probing.

Model: a randomly initialised GPT-2 small (``GPT2Config()``, 124M parameters, float32, CPU,
eager attention; no download), one calibration batch, eval mode. Timed side by side in this run
(median of ``--repeats``, variants interleaved):

* ``plain HVP``: forward, ``autograd.grad(loss, params, create_graph=True)``, dot with a fixed
  +-1 vector over all parameters, second ``autograd.grad``: the textbook Hessian-vector product
  with nothing else.
* ``probe (1)``: cwa's ``hutchinson_diagonal`` with ``probes=1`` (the metric core, without the
  score-file/statistics pass that every metric shares): Rademacher draw over all 124M weights,
  forward, first-order graph, second backward, accumulation of z * Hz.
* ``probe (P)``: the same with ``--probes P``, reported per probe: cwa builds a batch's
  first-order graph once and reuses it for every probe.
* ``old per-tensor design``: one probe per parameter tensor (z on that tensor only, a full
  forward and double backward each time), timed on ``--sample-tensors`` tensors and
  extrapolated to all 148 tensors of GPT-2.

Run: ``python benchmarks/bench_hutchinson.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 x 64 tokens, fewer repeats")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--sample-tensors", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quick = {"batch_size": 1, "seq_len": 64, "repeats": 2, "probes": 4, "sample_tensors": 3}
    full = {"batch_size": 2, "seq_len": 128, "repeats": 3, "probes": 8, "sample_tensors": 6}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.metrics.base import ScoringContext, rademacher
    from cwa.metrics.hessian import hutchinson_diagonal
    from cwa.models.architecture import build_architecture_map

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    arch = build_architecture_map(model)
    names, params = zip(*model.named_parameters(), strict=True)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    vector = [rademacher(p.shape, generator) for p in params]

    def loss_of() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss

    def plain_hvp() -> None:
        grads = torch.autograd.grad(loss_of(), params, create_graph=True)
        dot = sum(
            torch.dot(g.reshape(-1), v.reshape(-1)) for g, v in zip(grads, vector, strict=True)
        )
        torch.autograd.grad(dot, params)

    def probes(count: int) -> None:
        ctx = ScoringContext(
            model=model,
            batches=[batch],
            arch=arch,
            selected=list(names),
            scope_masks=dict.fromkeys(names),
            parameters=dict(zip(names, params, strict=True)),
            seed=0,
            options={"probes": count},
        )
        for _ in hutchinson_diagonal(ctx):
            pass

    def per_tensor_probe(index: int) -> None:
        # The old design: a whole double backward for one tensor's probe.
        grads = torch.autograd.grad(loss_of(), params, create_graph=True)
        dot = torch.dot(grads[index].reshape(-1), vector[index].reshape(-1))
        torch.autograd.grad(dot, params[index])

    def timed(fn, *fn_args) -> float:
        start = time.perf_counter()
        fn(*fn_args)
        return time.perf_counter() - start

    print(
        f"GPT-2 small (random init, eager attention), {len(params)} tensors, "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters; batch {args.batch_size} x "
        f"{args.seq_len} tokens; {args.threads} thread(s)"
    )
    plain_hvp()  # warm-up
    hvp_times, one_times, many_times = [], [], []
    for _ in range(args.repeats):
        hvp_times.append(timed(plain_hvp))
        one_times.append(timed(probes, 1))
        many_times.append(timed(probes, args.probes) / args.probes)
    hvp, one, many = (statistics.median(t) for t in (hvp_times, one_times, many_times))
    step = max(1, len(params) // args.sample_tensors)
    sample = list(range(0, len(params), step))[: args.sample_tensors]
    per_tensor = statistics.mean(timed(per_tensor_probe, i) for i in sample)
    old_design = per_tensor * len(params)

    def runs(times: list[float]) -> str:
        return ", ".join(f"{t:.2f}" for t in times)

    print(f"plain HVP                 : median {hvp:7.2f} s  runs {runs(hvp_times)}")
    print(f"cwa probe, probes=1       : median {one:7.2f} s  runs {runs(one_times)}")
    print(
        f"cwa probe, probes={args.probes:<2d} each : median {many:7.2f} s  runs {runs(many_times)}"
    )
    print(
        f"old per-tensor probe      : {per_tensor:.2f} s per tensor (mean of {len(sample)}) "
        f"x {len(params)} tensors = {old_design:.1f} s per probe (extrapolated)"
    )
    print(f"ratio plain HVP / cwa probe (probes=1)          : {hvp / one:.3f}  (target >= 0.8)")
    print(f"ratio plain HVP / cwa probe (probes={args.probes}, per probe): {hvp / many:.3f}")
    print(f"speed-up over the per-tensor design (probes=1)  : {old_design / one:.1f}x")
    print(f"speed-up over the per-tensor design (probes={args.probes})  : {old_design / many:.1f}x")


if __name__ == "__main__":
    main()
