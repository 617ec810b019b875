"""Scoring peak memory and throughput vs a bare Hugging Face forward + backward.

A Llama model with a 32k vocabulary is built from a config (random weights, no hub), and the
same calibration batch (16 x 256 tokens by default) goes through

* ``bare``: ``model(input_ids, labels=input_ids).loss.backward()`` -- what any training or
  gradient script does, with [batch, tokens, vocab] float32 logits and their gradient;
* ``cwa``: :func:`cwa.metrics.scoring.score_model` with ``grad_x_weight`` (calibration loss,
  gradients, |w * g| for every weight, statistics, the score file written tensor by tensor),
  which runs the LM head chunk by chunk (:mod:`cwa.evaluation.lm_head`).

Each variant runs in its own fresh process, one thread; peak memory is the process's resident
high-water mark during the computation minus its resident size just before it; time is the
process's CPU time (best of two passes), which other load on a shared machine inflates less
than wall time. The variants run ``--repeats`` times, interleaved; medians and the ratios are
printed side by side (targets: memory ratio <= 0.6, throughput ratio >= 1), with the
throughput ratio of every round.

``--checkpointing`` adds, side by side, ``grad_x_weight`` and ``hutchinson_diag`` (``--probes``
probes on ``--hessian-batch`` sequences) with and without ``--activation-checkpointing``, and
``hutchinson_diag`` through the head's previous second-order path (each chunk of positions
checkpointed) vs today's differentiable fused head: peak memory, CPU time and whether the loss
is identical.

    python benchmarks/bench_score_memory.py [--vocab 32000] [--batch 16] [--seq 256]
        [--repeats 3] [--checkpointing]
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("bare", "cwa", "cwa-ckpt", "hutchinson-chunks", "hutchinson", "hutchinson-ckpt")


def _use_checkpointed_chunks() -> None:
    """The head's previous second-order path, for a side-by-side row: every chunk of positions
    under torch.utils.checkpoint, so a double backward keeps each chunk's logits in the
    first-order graph (today that path serves only heads with a bias)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    import cwa.evaluation.lm_head as lm_head

    def chunked_nll(head, hidden, targets, *, chunk_bytes=None):  # noqa: ANN001, ANN202
        rows = lm_head.chunk_rows(int(head.weight.shape[0]), chunk_bytes)
        pieces = [
            checkpoint(lm_head._nll_of_chunk, head, hidden[s : s + rows], targets[s : s + rows],
                       use_reentrant=False)
            for s in range(0, int(hidden.shape[0]), rows)
        ]  # fmt: skip
        return torch.cat(pieces)

    lm_head.chunked_nll = chunked_nll


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(args: argparse.Namespace):  # noqa: ANN202
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return model, ids


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    model, ids = _build(args)
    if args.variant != "bare":
        from cwa.metrics.scoring import score_model
        from cwa.models.architecture import build_architecture_map

        arch = build_architecture_map(model)
        out = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        hessian = args.variant.startswith("hutchinson")
        if hessian:
            ids = ids[: args.hessian_batch]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        metric = "hutchinson_diag" if hessian else "grad_x_weight"
        extra = {"probes": args.probes} if hessian else {}
        checkpointing = args.variant.endswith("-ckpt")
        if args.variant == "hutchinson-chunks":
            _use_checkpointed_chunks()

        def run() -> float:
            outcome = score_model(
                model, [batch], metric, arch=arch, out_path=out,
                activation_checkpointing=checkpointing, **extra,
            )  # fmt: skip
            return float(outcome.loss)
    else:

        def run() -> float:
            for p in model.parameters():
                p.grad = None
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return float(loss)

    import gc

    gc.collect()
    before = _rss_bytes()
    start = time.process_time()
    loss = run()
    seconds = time.process_time() - start
    peak = _peak_bytes() - before
    start = time.process_time()
    run()  # a second pass for the time (no first-call effects)
    seconds = min(seconds, time.process_time() - start)
    print(json.dumps({"peak": peak, "seconds": seconds, "loss": loss}))


def _measure(args: argparse.Namespace, variant: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--variant", variant]
    for key in ("vocab", "hidden", "layers", "batch", "seq", "hessian_batch", "probes"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    # The checkout first on the worker's path: it must import this cwa, not an installed one.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--checkpointing", action="store_true",
        help="also grad_x_weight and hutchinson_diag with --activation-checkpointing, side by side",
    )  # fmt: skip
    parser.add_argument("--hessian-batch", type=int, default=4, help="sequences (Hessian rows)")
    parser.add_argument("--probes", type=int, default=2, help="Hutchinson probes (Hessian rows)")
    parser.add_argument("--variant", choices=VARIANTS, default=None)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return
    variants = list(VARIANTS if args.checkpointing else VARIANTS[:2])
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit all
        for variant in variants:
            runs[variant].append(_measure(args, variant))
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("peak", "seconds")}
        for v, rs in runs.items()
    }
    tokens = args.batch * args.seq
    bare, cwa = med["bare"], med["cwa"]
    mib = 1 << 20
    print(
        f"Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}, "
        f"{args.batch}x{args.seq} tokens, 1 thread, median of {args.repeats} interleaved rounds"
    )
    print(f"{'':24}{'bare HF fwd+bwd':>18}{'cwa score':>14}{'ratio cwa/bare':>16}")
    print(
        f"{'peak memory (MiB)':24}{bare['peak'] / mib:>18.0f}{cwa['peak'] / mib:>14.0f}"
        f"{cwa['peak'] / bare['peak']:>16.2f}"
    )
    print(
        f"{'throughput (tokens/s)':24}{tokens / bare['seconds']:>18.0f}"
        f"{tokens / cwa['seconds']:>14.0f}{bare['seconds'] / cwa['seconds']:>16.2f}"
    )
    print(f"{'loss':24}{runs['bare'][0]['loss']:>18.6f}{runs['cwa'][0]['loss']:>14.6f}")
    rounds = [b["seconds"] / c["seconds"] for b, c in zip(runs["bare"], runs["cwa"], strict=True)]
    print("throughput ratio per round: " + ", ".join(f"{r:.2f}" for r in rounds))
    if not args.checkpointing:
        return
    print()
    print(
        f"activation checkpointing (off -> on), grad_x_weight on {args.batch}x{args.seq} "
        f"tokens, hutchinson_diag ({args.probes} probes) on {args.hessian_batch}x{args.seq}"
    )
    print(f"{'':24}{'peak off':>10}{'peak on':>10}{'ratio':>8}{'CPU s off':>11}{'CPU s on':>10}"
          f"{'ratio':>8}{'loss equal':>12}")  # fmt: skip
    for label, off, on in (
        ("grad_x_weight", "cwa", "cwa-ckpt"),
        ("hutchinson_diag", "hutchinson", "hutchinson-ckpt"),
        ("hutchinson, head", "hutchinson-chunks", "hutchinson"),
    ):
        a, b = med[off], med[on]
        same = runs[off][0]["loss"] == runs[on][0]["loss"]
        print(
            f"{label:24}{a['peak'] / mib:>10.0f}{b['peak'] / mib:>10.0f}"
            f"{b['peak'] / a['peak']:>8.2f}{a['seconds']:>11.2f}{b['seconds']:>10.2f}"
            f"{b['seconds'] / a['seconds']:>8.2f}{str(same):>12}"
        )

    print("(last row: 'off' = checkpointed head chunks, the previous second-order path; 'on' =")
    print(" the differentiable fused head; both without activation checkpointing)")


if __name__ == "__main__":
    main()
