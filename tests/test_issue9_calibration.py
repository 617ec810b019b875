"""Issue 9, defect 1: a real (non-toy) model never calibrates on the toy text by default.

Without --data a non-toy model calibrates on WikiText-2 raw train; offline that is a one-line
error telling to pass --data FILE (and no run is registered). The resolved source and its
sha256 are on the run and in ``cwa runs show``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cwa.data.text import DEFAULT_CALIBRATION_SOURCE
from cwa.store import Store


def _n_runs(store_path: Path) -> int:
    if not (store_path / "cwa.duckdb").exists():
        return 0
    with Store(store_path).read() as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


def _score_args(world) -> list[str]:
    return ["--model", str(world["model"]), "--n-samples", "4", "--seq-len", "16"]


def test_score_without_data_offline_names_the_fix_and_registers_nothing(
    cli, tiny_world, store_path
) -> None:
    before = _n_runs(store_path)
    result = cli("score", *_score_args(tiny_world))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "--data FILE" in lines[0] and "wikitext-2-raw-v1" in lines[0]
    assert _n_runs(store_path) == before


def test_cwa_run_without_data_offline_fails_the_same_way(cli, tiny_world, store_path) -> None:
    before = _n_runs(store_path)
    result = cli("run", *_score_args(tiny_world), "--topk", "5", "--tasks", "perplexity")
    assert result.exit_code == 1
    assert "--data FILE" in result.stderr and result.stderr.count("\n") == 1
    assert _n_runs(store_path) == before


def _fake_wikitext(monkeypatch: pytest.MonkeyPatch, texts: list[str]) -> list[tuple]:
    """Stand-in for the hub: records which dataset was asked for, returns a real Dataset."""
    import datasets

    import cwa.data.text as text_module

    asked: list[tuple] = []

    def fake_load(name, config, split):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(text_module, "load_hf_dataset", fake_load)
    return asked


def test_default_for_a_real_model_is_wikitext_and_runs_show_names_it(
    cli, tiny_world, store_path, monkeypatch
) -> None:
    sentences = Path(tiny_world["text"]).read_text().splitlines()
    asked = _fake_wikitext(monkeypatch, sentences)
    result = cli("--json", "score", *_score_args(tiny_world))
    assert result.exit_code == 0, result.stderr
    (run_id,) = [r["run_id"] for r in json.loads(result.stdout)["runs"]]
    assert asked and asked[0] == ("wikitext", "wikitext-2-raw-v1", "train")
    with Store(store_path).read() as con:
        config = json.loads(
            con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        )
    assert config["data"]["source"] == DEFAULT_CALIBRATION_SOURCE != "toy"
    calib = config["calibration"]
    assert calib["source"] == DEFAULT_CALIBRATION_SOURCE and calib["default"] is True
    expected = hashlib.sha256(b"".join(s.encode() + b"\0" for s in sentences)).hexdigest()
    assert calib["text_sha256"] == expected
    shown = cli("runs", "show", run_id)
    assert shown.exit_code == 0 and DEFAULT_CALIBRATION_SOURCE in shown.stdout


def test_a_local_file_is_recorded_with_its_sha256(cli, tiny_world, store_path) -> None:
    result = cli("--json", "score", *_score_args(tiny_world), "--data", str(tiny_world["text"]))
    assert result.exit_code == 0, result.stderr
    run_id = json.loads(result.stdout)["runs"][0]["run_id"]
    shown = cli("runs", "show", run_id)
    digest = hashlib.sha256(Path(tiny_world["text"]).read_bytes()).hexdigest()
    assert digest in shown.stdout and str(Path(tiny_world["text"]).resolve()) in shown.stdout
    assert '"default": false' in shown.stdout


def test_toy_text_only_defaults_for_toy_models() -> None:
    from cwa.data.calibration import resolve_calibration_source

    assert resolve_calibration_source(None, "toy") == ("toy", True)
    assert resolve_calibration_source(None, "toy-llama") == ("toy", True)
    assert resolve_calibration_source(None, "./smollm2") == (DEFAULT_CALIBRATION_SOURCE, True)
    assert resolve_calibration_source("toy", "./smollm2") == ("toy", False)  # asked explicitly
