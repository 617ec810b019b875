"""Toy model build: bit-for-bit determinism, HF-format output, and the cache's behaviour.

Builds here use a few training steps (the recipe's ``steps`` lowered); the real build and its
task accuracies are checked in ``test_toy_model_quality.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cwa.toy.cache as toy_cache
from cwa.errors import CwaError, InvalidInput
from cwa.progress import NullReporter
from cwa.toy import ToyTrainConfig, build_toy_model, ensure_toy_model, toy_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One thread: immune to OpenMP spin-waiting when the test machine is busy (the real build
# uses two threads in a child process that waits politely; see cwa.toy.worker).
QUICK = {v: ToyTrainConfig(variant=v, steps=4, eval_items=20, threads=1)
         for v in ("gpt2", "llama")}


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
    cfg = replace(QUICK[variant], eval_items=0)
    a = build_toy_model(tmp_path / "a", variant, config=cfg, cache_dir=tmp_path)
    b = build_toy_model(tmp_path / "b", variant, config=cfg, cache_dir=tmp_path)
    c = build_toy_model(tmp_path / "c", variant, config=replace(cfg, seed=1), cache_dir=tmp_path)
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


def _fake_build(calls: list[Path], sleep: float = 0.0):
    """Stands in for the child-process build: writes a valid marker at once."""

    def build(folder, variant, cfg, cache_dir, reporter):
        calls.append(Path(folder))
        time.sleep(sleep)
        (Path(folder) / "config.json").write_text("{}")
        marker = {"generator_version": toy_cache.GENERATOR_VERSION,
                  "generator_fingerprint": toy_cache.generator_fingerprint(),
                  "config": asdict(cfg), "final_loss": 1.0}
        (Path(folder) / "cwa_toy.json").write_text(json.dumps(marker))
        return marker

    return build


@pytest.fixture
def quick_recipe(monkeypatch):
    """Make the cached recipe a 4-step one."""
    monkeypatch.setattr(toy_cache, "default_train_config", lambda v: QUICK[v])


def test_cache_builds_once_in_a_child_process_then_loads(tmp_path, quick_recipe, monkeypatch):
    calls: list[Path] = []
    real = toy_cache._build_for_cache

    def spy(folder, variant, cfg, cache_dir, reporter):
        calls.append(Path(folder))
        return real(folder, variant, cfg, cache_dir, reporter)

    monkeypatch.setattr(toy_cache, "_build_for_cache", spy)
    info = toy_info(tmp_path)
    assert not info["models"]["gpt2"]["built"] and not info["data"]["built"]
    reporter = CountingReporter()
    path = ensure_toy_model("gpt2", cache_dir=tmp_path, reporter=reporter)
    assert path == tmp_path / "toy" / f"gpt2-v{toy_cache.GENERATOR_VERSION}"
    assert len(calls) == 1
    # the child's progress reached this process's reporter
    assert reporter.tasks == [("training toy-gpt2", 4)] and reporter.advanced == 4
    marker = (path / "cwa_toy.json").read_bytes()
    # the child-built model equals an in-process build of the same recipe, bit for bit
    build_toy_model(tmp_path / "inproc", "gpt2", config=QUICK["gpt2"], cache_dir=tmp_path)
    assert (path / "model.safetensors").read_bytes() == \
        (tmp_path / "inproc" / "model.safetensors").read_bytes()
    assert ensure_toy_model("gpt2", cache_dir=tmp_path) == path
    assert len(calls) == 1
    assert (path / "cwa_toy.json").read_bytes() == marker
    info = toy_info(tmp_path)
    assert info["models"]["gpt2"]["built"] and info["data"]["built"]
    assert info["models"]["gpt2"]["figures"]["final_loss"] > 0
    assert not info["models"]["llama"]["built"]
    monkeypatch.setenv("CWA_CACHE", str(tmp_path))
    assert ensure_toy_model() == path and len(calls) == 1


def test_force_changed_recipe_or_generator_version_rebuild(tmp_path, quick_recipe, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(toy_cache, "_build_for_cache", _fake_build(calls))
    path = ensure_toy_model("gpt2", cache_dir=tmp_path)
    assert ensure_toy_model("gpt2", cache_dir=tmp_path) == path and len(calls) == 1
    ensure_toy_model("gpt2", cache_dir=tmp_path, force=True)
    assert len(calls) == 2
    # no temporary or trash folder is left behind
    names = sorted(p.name for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock"))
    assert names == sorted([path.name, f"data-v{toy_cache.GENERATOR_VERSION}"])
    monkeypatch.setattr(toy_cache, "default_train_config", lambda v: replace(QUICK[v], steps=5))
    assert toy_info(tmp_path)["models"]["gpt2"]["stale"]
    assert ensure_toy_model("gpt2", cache_dir=tmp_path) == path and len(calls) == 3
    assert json.loads((path / "cwa_toy.json").read_text())["config"]["steps"] == 5
    monkeypatch.setattr(toy_cache, "generator_fingerprint", lambda: "changed")
    assert toy_info(tmp_path)["models"]["gpt2"]["stale"]
    monkeypatch.setattr(toy_cache, "GENERATOR_VERSION", 999)
    new = ensure_toy_model("gpt2", cache_dir=tmp_path)
    assert new.name == "gpt2-v999" and len(calls) == 4


def test_crash_during_build_leaves_no_half_cache(tmp_path, monkeypatch):
    def crashing_build(folder, variant, cfg, cache_dir, reporter):
        (Path(folder) / "config.json").write_text("{}")
        raise CwaError("simulated crash")

    monkeypatch.setattr(toy_cache, "_build_for_cache", crashing_build)
    with pytest.raises(CwaError, match="simulated"):
        ensure_toy_model("gpt2", cache_dir=tmp_path)
    left = [p.name for p in (tmp_path / "toy").iterdir()
            if not p.name.endswith(".lock") and not p.name.startswith("data-")]
    assert left == []
    assert not toy_info(tmp_path)["models"]["gpt2"]["built"]


def test_failing_child_process_is_a_clear_error(tmp_path):
    from cwa.toy import ToyBuildError
    from cwa.toy.worker import run_build_in_child

    # a typed error inside the child comes back with its class and message
    bad_pair = asdict(QUICK["llama"])
    with pytest.raises(ToyBuildError, match="InvalidInput: toy config is for 'llama'"):
        run_build_in_child(tmp_path / "a", "gpt2", bad_pair, str(tmp_path))
    # any other crash names the exit code and the last line the child wrote to stderr
    bad_heads = asdict(replace(QUICK["gpt2"], n_head=3))
    with pytest.raises(ToyBuildError, match="exited with code 1 .*divisible"):
        run_build_in_child(tmp_path / "b", "gpt2", bad_heads, str(tmp_path))


def test_recipe_rejects_bad_values():
    with pytest.raises(InvalidInput, match="learning rate"):
        ToyTrainConfig(lr=float("nan"))
    with pytest.raises(InvalidInput, match="steps"):
        ToyTrainConfig(steps=0)


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(toy_cache, "_build_for_cache", _fake_build(calls, sleep=0.5))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_toy_model("gpt2", cache_dir=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1
