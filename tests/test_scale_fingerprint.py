"""Fingerprints are hashed once per state of the weight files; touching or rewriting a file
hashes again; in-memory models are always hashed by content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    import cwa.models.fingerprint as fp

    monkeypatch.setenv("CWA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CWA_FINGERPRINT_CACHE", raising=False)
    calls: list[int] = []
    real = fp.model_fingerprint

    def counting(model, *, reporter=None):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(model, reporter=reporter)

    monkeypatch.setattr(fp, "model_fingerprint", counting)
    return calls


def _tiny_folder(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        path
    )
    return path


def _hand_fingerprint(model: torch.nn.Module) -> str:
    """Independent content hash, as documented in cwa.models.fingerprint (v1)."""
    import hashlib

    from cwa.models.fingerprint import canonical_config_json

    d = hashlib.sha256(b"cwa-fingerprint-v1\0")
    d.update(canonical_config_json(model).encode())
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        d.update(f"\0{name}\0{str(p.dtype)[6:]}\0{list(p.shape)}".encode())
        d.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return d.hexdigest()


def test_second_load_does_not_rehash_and_touch_invalidates(tmp_path: Path, counted) -> None:
    from cwa.models.loading import load_model

    folder = _tiny_folder(tmp_path / "m")
    first = load_model(str(folder), device="cpu", load_tokenizer=False)
    assert len(counted) == 1
    assert first.fingerprint == _hand_fingerprint(first.model)
    second = load_model(str(folder), device="cpu", load_tokenizer=False)
    assert len(counted) == 1  # served from the cache, no weight bytes hashed
    assert second.fingerprint == first.fingerprint

    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    third = load_model(str(folder), device="cpu", load_tokenizer=False)
    assert len(counted) == 2 and third.fingerprint == first.fingerprint

    _tiny_folder(folder, seed=1)  # rewritten with other weights
    fourth = load_model(str(folder), device="cpu", load_tokenizer=False)
    assert len(counted) == 3
    assert fourth.fingerprint == _hand_fingerprint(fourth.model) != first.fingerprint

    # Another dtype is another fingerprint (different bytes), cached separately.
    half = load_model(str(folder), dtype="bfloat16", device="cpu", load_tokenizer=False)
    assert len(counted) == 4 and half.fingerprint == _hand_fingerprint(half.model)


def test_in_memory_models_are_always_hashed(tmp_path: Path, counted) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from cwa.models.fingerprint_cache import cached_model_fingerprint, weight_files

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    a = cached_model_fingerprint(model, None)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # perturbed in memory
    b = cached_model_fingerprint(model, None)
    assert len(counted) == 2 and a != b == _hand_fingerprint(model)
    assert weight_files(tmp_path) is None and weight_files(None) is None


def test_cache_can_be_turned_off(tmp_path: Path, counted, monkeypatch) -> None:
    from cwa.models.loading import load_model

    folder = _tiny_folder(tmp_path / "m")
    monkeypatch.setenv("CWA_FINGERPRINT_CACHE", "0")
    load_model(str(folder), device="cpu", load_tokenizer=False)
    load_model(str(folder), device="cpu", load_tokenizer=False)
    assert len(counted) == 2
