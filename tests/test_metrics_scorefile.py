"""Streaming score files, per-tensor statistics and the metric registry."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cwa.errors import InvalidInput
from cwa.metrics import BUILTIN_METRICS, METRICS, get_metric, list_metrics
from cwa.metrics.stats import score_stats
from cwa.scorefile import ScoreFileWriter, load_scores, open_scores, read_score_header


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.rand(5, 7, generator=generator),
        "a.bias": torch.rand(3, generator=generator),
        "empty": torch.zeros(0, 4),
        "c.weight": torch.rand(2, 3, 4, generator=generator),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_file_reads_back_with_safe_open(tmp_path, dtype):
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in sample_tensors().items()}
    path = tmp_path / "s.safetensors"
    entries = [(name, tuple(t.shape)) for name, t in tensors.items()]
    with ScoreFileWriter(path, entries, dtype, {"metric": "x"}) as writer:
        assert writer.pending == list(tensors)
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"metric": "x"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    with open_scores(path) as reader:
        assert reader.names() == list(tensors)  # written order, not alphabetical
        assert reader.shape("c.weight") == (2, 3, 4)
    # The layout is standard: 8-byte little-endian header size, JSON, aligned data.
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert header["b.weight"]["data_offsets"] == [0, 35 * tensors["b.weight"].element_size()]


def test_same_inputs_give_identical_bytes_and_match_reference_layout(tmp_path):
    tensors = sample_tensors()
    for name in ("one", "two"):
        with ScoreFileWriter(tmp_path / name, [(n, t.shape) for n, t in tensors.items()]) as w:
            for n, t in tensors.items():
                w.write(n, t)
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    # Same tensors saved by the safetensors library load identically.
    save_file(tensors, str(tmp_path / "ref"))
    ours, ref = load_scores(tmp_path / "one"), load_scores(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ours)


def test_writer_enforces_declared_order_and_removes_partial_files(tmp_path):
    path = tmp_path / "s.safetensors"
    entries = [("a", (2,)), ("b", (3,))]
    with pytest.raises(InvalidInput, match="expected tensor 'a'"):
        with ScoreFileWriter(path, entries) as writer:
            writer.write("b", torch.zeros(3))
    with pytest.raises(InvalidInput, match="shape"):
        with ScoreFileWriter(path, entries) as writer:
            writer.write("a", torch.zeros(3))
    with pytest.raises(InvalidInput, match="unwritten"):
        with ScoreFileWriter(path, entries) as writer:
            writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError):
        with ScoreFileWriter(path, entries) as writer:
            writer.write("a", torch.zeros(2))
            raise RuntimeError("metric crashed")
    assert list(tmp_path.iterdir()) == []


def test_missing_score_file_is_a_clear_error(tmp_path):
    from cwa.errors import DataError

    with pytest.raises(DataError, match="cwa score"):
        read_score_header(tmp_path / "nope.safetensors")


def test_stats_match_numpy_definitions():
    generator = np.random.default_rng(0)
    values = generator.standard_normal(10_001).astype(np.float32) ** 2
    values[:50] = 0.0
    row = score_stats(values)
    as64 = values.astype(np.float64)
    assert row["numel"] == 10_001 and row["zeros"] == 50 and row["nonfinite"] == 0
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)):
        assert row[name] == pytest.approx(np.quantile(as64, q), rel=1e-6)
    assert row["mean"] == pytest.approx(as64.mean())
    assert row["std"] == pytest.approx(as64.std())
    assert row["sum"] == pytest.approx(as64.sum())
    assert (row["min"], row["max"]) == (float(values.min()), float(values.max()))
    top = math.ceil(0.01 * values.size)
    assert row["top1pct_mass_share"] == pytest.approx(np.sort(as64)[-top:].sum() / as64.sum())


def test_stats_with_negative_scores_use_absolute_mass():
    values = np.array([-10.0] + [1.0] * 99, dtype=np.float32)
    row = score_stats(values)
    assert row["top1pct_mass_share"] == pytest.approx(10.0 / 109.0)
    assert score_stats(np.array([np.nan, 1.0], dtype=np.float32))["nonfinite"] == 1
    assert score_stats(np.zeros(0, dtype=np.float32))["mean"] is None


def test_listing_metrics_does_not_import_torch():
    code = (
        "import sys, cwa.metrics as m; rows = m.list_metrics(); "
        "print(len(rows), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == [str(len(BUILTIN_METRICS)), "False"], result.stderr


def test_builtin_specs_agree_with_the_registry():
    listed = dict(list_metrics())
    assert set(listed) == {
        "magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "obd", "wanda",
        "super_weight", "random",
    }  # fmt: skip
    for name, description in listed.items():
        spec = get_metric(name)
        assert spec.name == name and spec.description == description and spec.version
    with pytest.raises(Exception, match="did you mean"):
        METRICS.canonical("grad_x_weigth")
