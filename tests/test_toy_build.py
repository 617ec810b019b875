"""Toy model build: bit-for-bit determinism, HF-format output, and the cache's behaviour.

Builds here use a few training steps (the recipe's ``steps`` lowered); the real build and its
task accuracies are checked in ``test_toy_model_quality.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cwa.toy.cache as toy_cache
from cwa.errors import CwaError, InvalidInput
from cwa.progress import NullReporter
from cwa.toy import ToyTrainConfig, build_toy_model, ensure_toy_model, toy_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = {"gpt2": ToyTrainConfig(variant="gpt2", steps=4),
         "llama": ToyTrainConfig(variant="llama", steps=4)}


class CountingReporter(NullReporter):
    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.advanced = 0

    def task(self, description, total=None):
        self.tasks.append((description, total))
        outer = self

        class Handle:
            def advance(self, n=1):
                outer.advanced += n

            def close(self):
                pass

        return Handle()


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_same_seed_gives_bit_identical_weights(tmp_path, variant):
    cfg = QUICK[variant]
    a = build_toy_model(tmp_path / "a", variant, config=cfg, cache_dir=tmp_path, evaluate=False)
    b = build_toy_model(tmp_path / "b", variant, config=cfg, cache_dir=tmp_path, evaluate=False)
    c = build_toy_model(tmp_path / "c", variant, config=replace(cfg, seed=1),
                        cache_dir=tmp_path, evaluate=False)
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 5
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["loss_curve"] == b["loss_curve"] and a["final_loss"] == b["final_loss"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c["loss_curve"] != a["loss_curve"]
    # the global torch settings are restored after training
    assert not torch.are_deterministic_algorithms_enabled()


def test_build_writes_a_loadable_hf_folder_and_reports_progress(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reporter = CountingReporter()
    threads = torch.get_num_threads()
    figures = build_toy_model(tmp_path / "m", "llama", config=QUICK["llama"],
                              cache_dir=tmp_path, reporter=reporter)
    assert torch.get_num_threads() == threads
    assert reporter.tasks == [("training toy-llama", 4)] and reporter.advanced == 4
    folder = tmp_path / "m"
    recorded = json.loads((folder / "cwa_toy.json").read_text())
    assert recorded == figures
    for key in ("generator_version", "seed", "train_seconds", "final_loss", "lambada_acc",
                "hellaswag_acc", "config"):
        assert key in recorded
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads == 4
    ids = tok("Mira is a baker in Dunmore.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_unknown_variant_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInput, match="gpt2"):
        ensure_toy_model("mamba", cache_dir=tmp_path)


@pytest.fixture
def quick_recipe(monkeypatch):
    """Make the 'cached recipe' a 4-step one and count real builds."""
    calls: list[Path] = []
    real_build = toy_cache.build_toy_model

    def counting_build(folder, variant="gpt2", **kw):
        calls.append(Path(folder))
        return real_build(folder, variant, **kw)

    monkeypatch.setattr(toy_cache, "default_train_config", lambda v: QUICK[v])
    monkeypatch.setattr(toy_cache, "build_toy_model", counting_build)
    return calls


def test_cache_builds_once_then_loads(tmp_path, quick_recipe):
    info = toy_info(tmp_path)
    assert not info["models"]["gpt2"]["built"] and not info["data"]["built"]
    path = ensure_toy_model("gpt2", cache_dir=tmp_path)
    assert path == tmp_path / "toy" / f"gpt2-v{toy_cache.GENERATOR_VERSION}"
    assert len(quick_recipe) == 1
    marker = (path / "cwa_toy.json").read_bytes()
    assert ensure_toy_model("gpt2", cache_dir=tmp_path) == path
    assert len(quick_recipe) == 1
    assert (path / "cwa_toy.json").read_bytes() == marker
    info = toy_info(tmp_path)
    assert info["models"]["gpt2"]["built"] and info["data"]["built"]
    assert info["models"]["gpt2"]["figures"]["final_loss"] > 0
    assert not info["models"]["llama"]["built"]
    # CWA_CACHE is the default location
    os.environ["CWA_CACHE"] = str(tmp_path)
    try:
        assert ensure_toy_model() == path and len(quick_recipe) == 1
    finally:
        del os.environ["CWA_CACHE"]
    # force rebuilds; no temporary folder is left behind
    ensure_toy_model("gpt2", cache_dir=tmp_path, force=True)
    assert len(quick_recipe) == 2
    assert sorted(p.name for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock")) \
        == sorted([path.name, f"data-v{toy_cache.GENERATOR_VERSION}"])


def test_changed_recipe_or_generator_version_rebuilds(tmp_path, quick_recipe, monkeypatch):
    path = ensure_toy_model("gpt2", cache_dir=tmp_path)
    monkeypatch.setattr(toy_cache, "default_train_config",
                        lambda v: replace(QUICK[v], steps=5))
    assert toy_info(tmp_path)["models"]["gpt2"]["stale"]
    assert ensure_toy_model("gpt2", cache_dir=tmp_path) == path
    assert len(quick_recipe) == 2
    assert json.loads((path / "cwa_toy.json").read_text())["config"]["steps"] == 5
    monkeypatch.setattr(toy_cache, "GENERATOR_VERSION", 999)
    new = ensure_toy_model("gpt2", cache_dir=tmp_path)
    assert new.name == "gpt2-v999" and len(quick_recipe) == 3


def test_crash_during_build_leaves_no_half_cache(tmp_path, monkeypatch):
    def crashing_build(folder, variant="gpt2", **kw):
        (Path(folder) / "config.json").write_text("{}")
        raise CwaError("simulated crash")

    monkeypatch.setattr(toy_cache, "build_toy_model", crashing_build)
    with pytest.raises(CwaError, match="simulated"):
        ensure_toy_model("gpt2", cache_dir=tmp_path)
    left = [p.name for p in (tmp_path / "toy").iterdir()
            if not p.name.endswith(".lock") and not p.name.startswith("data-")]
    assert left == []
    assert not toy_info(tmp_path)["models"]["gpt2"]["built"]


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls = []

    def slow_build(folder, variant="gpt2", **kw):
        calls.append(folder)
        time.sleep(0.5)
        folder = Path(folder)
        (folder / "config.json").write_text("{}")
        cfg = toy_cache.default_train_config(variant)
        marker = {"generator_version": toy_cache.GENERATOR_VERSION,
                  "config": toy_cache.asdict(cfg)}
        (folder / "cwa_toy.json").write_text(json.dumps(marker))
        return marker

    monkeypatch.setattr(toy_cache, "build_toy_model", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_toy_model("gpt2", cache_dir=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1
