"""A tiny local model + tokenizer + data files for fast stage tests (no toy training needed).

The model is a random 2-layer GPT-2 (a few tens of thousands of weights) saved in Hugging Face
format with a word-level tokenizer, so every stage runs through the same loading path as any
local model, in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the a cat dog bird sees likes finds eats red big small quick slow . and then "
    "alice bob carol walks runs home park tree ball"
).split()


def _sentence(rng: random.Random) -> str:
    return " ".join(
        [
            rng.choice(["the", "a"]),
            rng.choice(["red", "big", "small"]),
            rng.choice(["cat", "dog", "bird"]),
            rng.choice(["sees", "likes", "finds"]),
            rng.choice(["the", "a"]),
            rng.choice(["ball", "tree", "park"]),
            ".",
        ]
    )


def build_tiny_world(root: Path) -> dict[str, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<eos>",
        bos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=64,
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = GPT2LMHeadModel(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(
        "\n".join(" ".join(_sentence(rng) for _ in range(4)) for _ in range(120)) + "\n"
    )
    hellaswag = root / "hellaswag.jsonl"
    with hellaswag.open("w") as out:
        for i in range(12):
            ctx_a, ctx_b = _sentence(rng), "then the"
            endings = [f"{rng.choice(['cat', 'dog', 'bird'])} runs home ." for _ in range(4)]
            out.write(
                json.dumps(
                    {
                        "ind": i,
                        "activity_label": "Walking",
                        "ctx_a": ctx_a,
                        "ctx_b": ctx_b,
                        "ctx": f"{ctx_a} {ctx_b}",
                        "endings": endings,
                        "label": str(i % 4),
                        "source_id": f"tiny~{i}",
                        "split": "val",
                        "split_type": "indomain",
                    }
                )
                + "\n"
            )
    lambada = root / "lambada.jsonl"
    with lambada.open("w") as out:
        for _ in range(12):
            out.write(
                json.dumps(
                    {
                        "text": _sentence(rng)
                        + " "
                        + _sentence(rng)
                        + " alice sees the "
                        + rng.choice(["ball", "tree"])
                    }
                )
                + "\n"
            )
    return {
        "model": model_dir,
        "text": text,
        "hellaswag": hellaswag,
        "lambada": lambada,
        "root": root,
    }
