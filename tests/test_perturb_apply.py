"""In-place apply / exact restore: failures inside ``perturbed``, tampering, rollback, checksums."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput, RestoreError
from cwa.perturbation.apply import apply_perturbation, perturbed, restore_exact
from cwa.perturbation.checksum import (
    _lin64_sum,
    combine_checksums,
    named_checksums,
    same_checksum,
    tensor_checksum,
)
from cwa.perturbation.selection import Selection


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same_bits(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.view(torch.int32), saved[name].view(torch.int32)), name


SELECTION = Selection({"0.weight": torch.tensor([0, 5, 100, 191]), "2.bias": torch.tensor([3])})


def test_failure_inside_perturbed_still_restores() -> None:
    model = small_model()
    saved = snapshot(model)
    with pytest.raises(RuntimeError, match="evaluation blew up"):
        with perturbed(model, SELECTION, "sign_flip") as handle:
            assert model[0].weight.view(-1)[5] == -saved["0.weight"].view(-1)[5]
            raise RuntimeError("evaluation blew up")
    assert handle.restored
    assert_same_bits(model, saved)


def test_tampered_tensor_makes_restore_raise() -> None:
    model = small_model()
    with pytest.raises(RestoreError, match="0.weight"):
        with perturbed(model, SELECTION, "zero"):
            with torch.no_grad():
                model[0].weight.view(-1)[7] += 1.0  # not a selected entry: only a checksum sees it


def test_tamper_plus_body_failure_chains_both_errors() -> None:
    model = small_model()
    with pytest.raises(RestoreError) as info:
        with perturbed(model, SELECTION, "zero"):
            with torch.no_grad():
                model[2].bias.view(-1)[0] = 42.0
            raise ValueError("eval failed")
    assert isinstance(info.value.__context__, ValueError)


def test_writes_to_selected_entries_during_the_body_are_undone() -> None:
    model = small_model()
    saved = snapshot(model)
    with perturbed(model, SELECTION, "zero"):
        with torch.no_grad():
            model[0].weight.view(-1)[100] = 9.0  # a selected entry: restore overwrites it
    assert_same_bits(model, saved)


def test_restore_twice_is_a_no_op_and_records_checksums() -> None:
    model = small_model()
    handle = apply_perturbation(model, SELECTION, "scale", scale=4.0)
    after = restore_exact(handle)
    assert after == handle.checksums_before
    assert restore_exact(handle) == after
    record = handle.record()
    assert record["checksum_before"] == record["checksum_after"] == combine_checksums(after)
    assert record["k"] == 5 and record["restored"] is True
    # Only the originals and their indices are kept: 5 float32 + 5 int64.
    assert handle.saved_bytes == 5 * 4 + 5 * 8


def test_write_failure_rolls_back_earlier_tensors(monkeypatch) -> None:
    model = small_model()
    saved = snapshot(model)
    real_index_copy = torch.Tensor.index_copy_
    calls = {"n": 0}

    def failing_second_write(self, dim, index, source):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_index_copy(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", failing_second_write)
    with pytest.raises(RuntimeError, match="device lost"):
        apply_perturbation(model, SELECTION, "sign_flip")
    monkeypatch.undo()
    assert calls["n"] >= 3  # first write, failed write, rollback of the first
    assert_same_bits(model, saved)


def test_baseline_checksums_are_used_and_checked() -> None:
    model = small_model()
    baseline = named_checksums(model.named_parameters())
    with perturbed(model, SELECTION, "sign_flip", baseline_checksums=baseline) as handle:
        pass
    assert handle.checksums_before == {n: baseline[n] for n in SELECTION}
    # A baseline that does not describe the model is caught at restore.
    wrong = dict(baseline, **{"2.bias": tensor_checksum(torch.zeros(4))})
    with pytest.raises(RestoreError, match="2.bias"):
        with perturbed(model, SELECTION, "sign_flip", baseline_checksums=wrong):
            pass


def test_bad_selections_are_refused_before_any_write() -> None:
    model = small_model()
    saved = snapshot(model)
    cases = [
        (Selection({"0.weight": torch.tensor([3, 1])}), "sorted, unique"),
        (Selection({"0.weight": torch.tensor([1, 1])}), "sorted, unique"),
        (Selection({"0.weight": torch.tensor([192])}), r"\[0, 192\)"),
        (Selection({"0.weight": torch.tensor([-1])}), "sorted, unique"),
        (Selection({"0.weight": torch.tensor([1], dtype=torch.int32)}), "int64"),
        (Selection({"0.weight": torch.tensor([1]), "nope": torch.tensor([0])}), "'nope'"),
    ]
    for selection, message in cases:
        with pytest.raises(InvalidInput, match=message):
            apply_perturbation(model, selection, "zero")
    assert_same_bits(model, saved)


def test_tied_parameter_alias_is_refused_with_the_canonical_name() -> None:
    model = small_model()
    model.tied = model[0]  # same parameters under a second name
    with pytest.raises(InvalidInput, match="tied to '0.weight'"):
        apply_perturbation(model, Selection({"tied.weight": torch.tensor([0])}), "zero")


def test_names_sharing_storage_are_refused() -> None:
    model = small_model()
    state = dict(model.state_dict())
    state["alias.weight"] = state["0.weight"]  # a state dict of a model with tied weights
    selection = Selection({"0.weight": torch.tensor([1]), "alias.weight": torch.tensor([2])})
    with pytest.raises(InvalidInput, match="share storage"):
        apply_perturbation(state, selection, "zero")


def test_non_contiguous_and_non_float_parameters_are_refused() -> None:
    t = torch.randn(4, 6).t()
    with pytest.raises(InvalidInput, match="not contiguous"):
        apply_perturbation({"t": t}, Selection({"t": torch.tensor([0])}), "zero")
    q = torch.ones(4, dtype=torch.int8)
    with pytest.raises(InvalidInput, match="not floating point"):
        apply_perturbation({"q": q}, Selection({"q": torch.tensor([0])}), "zero")


# --- checksums --------------------------------------------------------------------------


def test_sha256_checksum_matches_an_independent_hash() -> None:
    t = torch.randn(3, 5)
    expected = hashlib.sha256(b"torch.float32|(3, 5)|" + t.numpy().tobytes()).hexdigest()
    assert tensor_checksum(t) == f"sha256:{expected}"
    assert tensor_checksum(t.t()) == tensor_checksum(t.t().contiguous())
    # Same bytes, different dtype or shape -> different checksum.
    assert tensor_checksum(t.view(torch.int32)) != tensor_checksum(t)
    assert tensor_checksum(t.reshape(5, 3)) != tensor_checksum(t)


def _splitmix(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("numel", [0, 1, 3, 2048, 2 * 1024 * 3 + 5])
def test_lin64_sum_matches_python_reference(numel: int) -> None:
    torch.manual_seed(numel)
    t = torch.randn(numel)
    data = t.numpy().tobytes()
    data += b"\x00" * (-len(data) % 8)
    words = np.frombuffer(data, dtype="<u8").tolist()
    expected = 0
    for i, word in enumerate(words):
        row, col = divmod(i, 1024)
        expected += _splitmix(word ^ _splitmix(col + 0x5EED)) * (_splitmix(row) | 1)
    assert _lin64_sum(t) == expected % (1 << 64)


def test_lin64_detects_every_single_bit_change() -> None:
    torch.manual_seed(0)
    t = torch.randn(2100, dtype=torch.float16)  # partial last row and a 4-byte tail
    base = tensor_checksum(t, "lin64")
    assert base.startswith("lin64:") and tensor_checksum(t.clone(), "lin64") == base
    bits = t.view(torch.int16)
    seen = {base}
    for position in range(0, t.numel(), 37):
        for bit in (0, 9, 14, 15):
            changed = bits.clone()
            changed[position] ^= torch.tensor(
                1 << bit if bit < 15 else -(1 << 15), dtype=torch.int16
            )
            checksum = tensor_checksum(changed.view(torch.float16), "lin64")
            assert checksum not in seen
            seen.add(checksum)


@pytest.mark.parametrize("algorithm", ["sha256", "lin64"])
def test_two_sign_flips_do_not_cancel(algorithm: str) -> None:
    # Flipping the top bit of two 64-bit words adds 2**63 twice: a linear hash would cancel.
    t = torch.randn(4096)
    flipped = t.clone()
    flipped[[1, 3]] = -flipped[[1, 3]]  # the sign bits of words 0 and 1 are their bit 63
    assert tensor_checksum(flipped, algorithm) != tensor_checksum(t, algorithm)


def test_checksums_of_different_algorithms_are_not_compared() -> None:
    t = torch.ones(3)
    assert same_checksum(tensor_checksum(t), tensor_checksum(t.clone()))
    with pytest.raises(InvalidInput, match="cannot compare"):
        same_checksum(tensor_checksum(t, "sha256"), tensor_checksum(t, "lin64"))
    with pytest.raises(InvalidInput, match="unknown checksum algorithm"):
        tensor_checksum(t, "md5")


def test_restore_with_lin64_checksums() -> None:
    model = small_model()
    saved = snapshot(model)
    with perturbed(model, SELECTION, "bit_flip", checksum_algorithm="lin64") as handle:
        assert all(c.startswith("lin64:") for c in handle.checksums_before.values())
    assert_same_bits(model, saved)
