"""GGUF model references without the real model: the missing-extra error and file discovery.

(The real GGUF load -- SmolLM2-135M Q4_1 -- is in test_real_smollm2.py, marked ``real``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cwa.errors import ModelLoadError
from cwa.models.gguf import find_gguf


def _n_runs(store_path: Path) -> int:
    from cwa.store import Store

    if not (store_path / "cwa.duckdb").exists():
        return 0
    with Store(store_path).read() as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


def test_without_the_extra_the_error_names_it_and_registers_nothing(
    cli, tmp_path, store_path, monkeypatch
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    before = _n_runs(store_path)
    result = cli("score", "--model", str(model), "--data", "toy", "--metric", "magnitude")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cwa[gguf]'" in lines[0] and "gguf" in lines[0]
    assert _n_runs(store_path) == before


def test_find_gguf(tmp_path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert find_gguf(str(single)).path == (single / "m.Q4_1.gguf").resolve()
    assert find_gguf(str(single / "m.Q4_1.gguf")).filename == "m.Q4_1.gguf"
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    (hf_folder / "extra.gguf").write_bytes(b"GGUF")
    assert find_gguf(str(hf_folder)) is None  # a Hugging Face folder stays one
    assert find_gguf("gpt2") is None and find_gguf("toy") is None
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        find_gguf(str(two))
