"""Throughput of the batched evaluation engine against a one-request-at-a-time loop.

All measurements score the same HellaSwag-style items (4 endings each) with the same model and
the same tokenized requests, side by side in one run:

* ``loop``: one forward pass per (context, ending) request with the full logits -- what an
  unbatched evaluator does (the harness with ``batch_size=1``);
* ``engine bs=1``: the engine's own code path with one request per forward (so the ratio to it
  isolates the gain of batching from that of scoring only continuation positions);
* ``engine bs=N``: the batched engine.

The script checks that the log-likelihoods agree, then prints items/s and the ratios.
Defaults: a 4-layer, 256-wide GPT-2 with GPT-2's vocabulary size (50257, so the LM head costs
what it costs in real models) and 1 torch thread: on a small shared CPU, extra OpenMP threads
spin against other processes and slow the many tiny single-request forwards far more than the
batched ones, which would flatter the ratio.

    python benchmarks/bench_eval.py [--items 48] [--batch-size 16] [--vocab 50257]
        [--layers 4] [--width 256] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from cwa.evaluation.engine import TokenRequest, encode_pairs, score_requests

WORDS = (
    "the a man woman dog cat child children park kitchen bowl flour guitar stage door chair "
    "walks runs sits plays mixes pours opens looks bakes sings jumps throws catches reads "
    "quickly slowly then and while with into onto over under near far happy loud quiet red"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def build_tokenizer(rng: random.Random):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sentence(rng, 12) for _ in range(2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def build_model(vocab: int, layers: int, width: int, device: str):
    """A random GPT-2; ``vocab`` may exceed the tokenizer's (unused rows cost like real ones)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=width, n_layer=layers, n_head=max(1, width // 64)
    )
    return GPT2LMHeadModel(config).to(device).eval()


def build_requests(tokenizer, rng: random.Random, n_items: int) -> list[TokenRequest]:
    pairs, groups = [], []
    for item in range(n_items):
        context = sentence(rng, rng.randint(25, 45))
        for _ in range(4):
            pairs.append((context, " " + sentence(rng, rng.randint(6, 16))))
            groups.append(item)
    encoded = encode_pairs(tokenizer, pairs)
    return [TokenRequest(tuple(c), tuple(t), g) for (c, t), g in zip(encoded, groups, strict=True)]


def one_at_a_time(model, requests: list[TokenRequest]) -> torch.Tensor:
    """The unbatched baseline: one forward pass per request."""
    device = next(model.parameters()).device
    out = torch.zeros(len(requests), dtype=torch.float64)
    with torch.inference_mode():
        for i, req in enumerate(requests):
            whole = list(req.context + req.continuation)
            logits = model(torch.tensor([whole[:-1]], device=device), use_cache=False).logits[0]
            n_cont = len(req.continuation)
            logprobs = torch.log_softmax(logits[-n_cont:].float(), dim=-1)
            target = torch.tensor(req.continuation, device=device)
            out[i] = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
    return out


def timed_side_by_side(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, object]]:
    """Median wall time and last result of each function, run round-robin so that all of them
    see the same background load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()  # type: ignore[operator]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = random.Random(0)
    tokenizer = build_tokenizer(rng)
    vocab = max(args.vocab, len(tokenizer))
    model = build_model(vocab, args.layers, args.width, args.device)
    requests = build_requests(tokenizer, rng, args.items)
    n_params = sum(p.numel() for p in model.parameters())

    # warm-up (allocator, kernels), then the measurements side by side
    score_requests(model, requests[:32], batch_size=args.batch_size)
    one_at_a_time(model, requests[:8])
    measured = timed_side_by_side(
        {
            "loop": lambda: one_at_a_time(model, requests),
            "bs1": lambda: score_requests(model, requests, batch_size=1)[0],
            "batched": lambda: score_requests(model, requests, batch_size=args.batch_size)[0],
        },
        args.repeats,
    )
    t_loop, looped = measured["loop"]
    t_bs1, single = measured["bs1"]
    t_batched, batched = measured["batched"]
    max_diff = max(
        float((batched - looped).abs().max()),  # type: ignore[operator]
        float((batched - single).abs().max()),  # type: ignore[operator]
    )

    print(
        f"model: GPT-2 {args.layers} layers x {args.width}, vocab {vocab}, "
        f"{n_params / 1e6:.1f}M params, device {args.device}, torch threads {args.threads}"
    )
    print(
        f"items: {args.items} (4 endings each, {len(requests)} requests), median of "
        f"{args.repeats} runs"
    )
    print(f"max |loglik difference| between the three = {max_diff:.2e}")
    print(f"one-at-a-time loop    : {args.items / t_loop:8.2f} items/s ({t_loop:.3f} s)")
    print(f"engine, bs=1          : {args.items / t_bs1:8.2f} items/s ({t_bs1:.3f} s)")
    print(
        f"engine, bs={args.batch_size:<3}        : {args.items / t_batched:8.2f} items/s "
        f"({t_batched:.3f} s)"
    )
    print(f"speed-up engine bs={args.batch_size} / one-at-a-time loop: {t_loop / t_batched:.2f}x")
    print(
        f"speed-up engine bs={args.batch_size} / engine bs=1 (batching alone): "
        f"{t_bs1 / t_batched:.2f}x"
    )


if __name__ == "__main__":
    main()
