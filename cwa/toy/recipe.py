"""The toy models' training recipe (sizes, schedule, seed) as plain data, without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cwa.errors import InvalidInput

VARIANTS = ("gpt2", "llama")


@dataclass(frozen=True)
class ToyTrainConfig:
    """Size and schedule of one toy model; ``steps`` may be lowered for quick tests."""

    variant: str = "gpt2"
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2  # Llama only (grouped-query attention)
    seq_len: int = 128  # longest training row; also the model's maximum context
    batch_size: int = 16
    steps: int = 1000
    # From step ``packed_from * steps`` on, every ``packed_every``-th batch packs documents
    # into full ``seq_len`` rows (EOS-separated, as evaluation streams are); the others hold
    # one document per row, where copying is learnt much sooner (no earlier story to confuse).
    packed_from: float = 0.6
    packed_every: int = 3
    lr: float = 3e-3
    warmup: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    # items of each task file scored for the accuracies recorded in cwa_toy.json (0: none)
    eval_items: int = 1000

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidInput(
                f"unknown toy variant {self.variant!r}; use one of {', '.join(VARIANTS)}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.packed_every < 1:
            raise InvalidInput("toy recipe needs steps, batch_size and packed_every >= 1")
        if self.eval_items < 0:
            raise InvalidInput("toy recipe eval_items must be >= 0 (0 skips the evaluation)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInput(f"toy recipe learning rate must be a positive number, not {self.lr}")

    def is_packed_step(self, step: int) -> bool:
        first = int(self.packed_from * self.steps)
        return step >= first and (step - first) % self.packed_every == 0
