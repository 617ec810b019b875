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
process's CPU time (best of two passes), which other load on a shared machine does not
inflate. Prints both and the ratios side by side (targets: memory ratio <= 0.6, throughput
ratio >= 1).

    python benchmarks/bench_score_memory.py [--vocab 32000] [--batch 16] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


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
    if args.variant == "cwa":
        from cwa.metrics.scoring import score_model
        from cwa.models.architecture import build_architecture_map

        arch = build_architecture_map(model)
        out = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def run() -> float:
            outcome = score_model(model, [batch], "grad_x_weight", arch=arch, out_path=out)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variant", choices=["bare", "cwa"], default=None)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return
    results = {}
    for variant in ("bare", "cwa"):
        cmd = [sys.executable, __file__, "--variant", variant]
        for key in ("vocab", "hidden", "layers", "batch", "seq"):
            cmd += [f"--{key}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq
    bare, cwa = results["bare"], results["cwa"]
    print(
        f"Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}, "
        f"{args.batch}x{args.seq} tokens, 1 thread"
    )
    print(f"{'':24}{'bare HF fwd+bwd':>18}{'cwa score':>14}{'ratio cwa/bare':>16}")
    mib = 1 << 20
    print(
        f"{'peak memory (MiB)':24}{bare['peak'] / mib:>18.0f}{cwa['peak'] / mib:>14.0f}"
        f"{cwa['peak'] / bare['peak']:>16.2f}"
    )
    print(
        f"{'throughput (tokens/s)':24}{tokens / bare['seconds']:>18.0f}"
        f"{tokens / cwa['seconds']:>14.0f}{bare['seconds'] / cwa['seconds']:>16.2f}"
    )
    print(f"{'loss':24}{bare['loss']:>18.6f}{cwa['loss']:>14.6f}")


if __name__ == "__main__":
    main()
