"""Perturbation methods: hand-computed bit patterns, exact effects on a tiny GPT-2, restore."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput
from cwa.perturbation import PERTURBATION_METHODS
from cwa.perturbation.apply import apply_perturbation, perturbed, restore_exact
from cwa.perturbation.methods import PerturbationMethod, default_flip_bit
from cwa.perturbation.scope import scope_from_params
from cwa.perturbation.selection import Selection, random_k
from cwa.progress import RecordingReporter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype])


def whole_selection(tensor: torch.Tensor) -> Selection:
    return Selection({"w": torch.arange(tensor.numel())})


# --- bit_flip against hand-computed patterns ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_bits"),
    [
        (1.0, 0x7F800000),  # 0x3F800000 ^ (1 << 30): +inf
        (0.5, 0x7F000000),  # 0x3F000000 ^ (1 << 30): 2**127
        (-0.75, 0xFF400000),  # 0xBF400000 ^ (1 << 30): -1.5 * 2**127
        (1.5, 0x7FC00000),  # 0x3FC00000 ^ (1 << 30): NaN (mantissa != 0)
        (0.0, 0x40000000),  # zero -> 2.0
        (2.0, 0x00000000),  # 0x40000000 ^ (1 << 30): +0.0
    ],
)
def test_bit_flip_float32_matches_hand_computed_pattern(value: float, expected_bits: int) -> None:
    w = torch.tensor([value], dtype=torch.float32)
    handle = apply_perturbation({"w": w}, whole_selection(w), "bit_flip")
    got = int(w.view(torch.int32).item()) & 0xFFFFFFFF
    assert got == expected_bits
    assert handle.bit == 30 and handle.n_changed == 1
    restore_exact(handle)
    assert w.item() == value


def test_bit_flip_float32_magnitudes() -> None:
    w = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float32)
    apply_perturbation({"w": w}, whole_selection(w), "bit_flip")
    assert w[0].item() == float("inf")
    assert w[1].item() == 2.0**127 == f32_from_bits(0x7F000000)
    assert w[2].item() == 2.0
    assert w[3].item() == 0.0


def test_bit_flip_bfloat16_and_float16_patterns() -> None:
    bf = torch.tensor([1.0, 0.5, 0.0], dtype=torch.bfloat16)
    apply_perturbation({"w": bf}, whole_selection(bf), "bit_flip")
    # bf16 is the top half of the float32 pattern: 0x3F80 -> 0x7F80 (inf), 0x3F00 -> 0x7F00.
    assert [int(b) & 0xFFFF for b in bits_of(bf).tolist()] == [0x7F80, 0x7F00, 0x4000]
    assert bf.float().tolist() == [float("inf"), 2.0**127, 2.0]

    hf = torch.tensor([1.0, 0.5, 0.0, -0.25], dtype=torch.float16)
    apply_perturbation({"w": hf}, whole_selection(hf), "bit_flip")
    # 0x3C00 -> 0x7C00 (inf); 0x3800 -> 0x7800 = 2**15 (0.5 * 2**16); -0.25: 0xB400 -> 0xF400.
    assert [int(b) & 0xFFFF for b in bits_of(hf).tolist()] == [0x7C00, 0x7800, 0x4000, 0xF400]
    expected = [
        struct.unpack("<e", struct.pack("<H", b))[0] for b in (0x7C00, 0x7800, 0x4000, 0xF400)
    ]
    assert hf.float().tolist() == expected
    assert expected[1] == 32768.0 and expected[3] == -0.25 * 2**16


def test_bit_flip_explicit_bits() -> None:
    w = torch.tensor([1.0, 1.0], dtype=torch.float32)
    apply_perturbation({"w": w}, Selection({"w": torch.tensor([0])}), "bit_flip", bit=0)
    apply_perturbation({"w": w}, Selection({"w": torch.tensor([1])}), "bit_flip", bit=31)
    assert w[0].item() == f32_from_bits(0x3F800001) == 1.0 + 2.0**-23
    assert w[1].item() == -1.0
    h = torch.tensor([1.0], dtype=torch.float16)
    apply_perturbation({"w": h}, whole_selection(h), "bit_flip", bit=15)
    assert h.item() == -1.0
    with pytest.raises(InvalidInput, match="bit 16 does not exist"):
        apply_perturbation({"w": h}, whole_selection(h), "bit_flip", bit=16)


def test_default_flip_bit_is_top_exponent_bit() -> None:
    assert default_flip_bit(torch.float32) == 30
    assert default_flip_bit(torch.bfloat16) == 14
    assert default_flip_bit(torch.float16) == 14
    assert default_flip_bit(torch.float64) == 62


# --- every method changes exactly the selected entries, on a whole model --------------------


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=97)
    model = GPT2LMHeadModel(config).eval()
    # Fresh GPT-2 biases are 0 and norm weights 1: zeroing or scaling those would (correctly)
    # change nothing, so give every weight a distinct nonzero value for an exact check.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + 0.01)
    return model


def expected_new_values(
    method: str, original: torch.Tensor, whole: torch.Tensor, name: str, seed: int
) -> torch.Tensor:
    """Independent re-implementation of each method for float32 weights."""
    if method == "zero":
        return torch.zeros_like(original)
    if method == "sign_flip":
        return -original
    if method == "scale":
        return (original.double() * 0.5).float()  # the float32 product is exact in float64
    if method == "gaussian_noise":
        digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        noise = torch.randn(original.numel(), generator=gen)
        sigma = float(np.std(whole.numpy().astype(np.float64)))
        return (original + 2.0 * torch.tensor(sigma, dtype=torch.float32) * noise).float()
    assert method == "bit_flip"
    flipped = original.numpy().view(np.uint32) ^ np.uint32(1 << 30)
    return torch.from_numpy(flipped.view(np.float32).copy())


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("zero", {}),
        ("sign_flip", {}),
        ("scale", {"scale": 0.5}),
        ("gaussian_noise", {"scale": 2.0}),
        ("bit_flip", {}),
    ],
)
def test_method_changes_exactly_the_selection(method: str, kwargs: dict) -> None:
    model = tiny_gpt2()
    scope = scope_from_params(model)
    selection = random_k(scope, 300, seed=3)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with perturbed(model, selection, method, seed=5, **kwargs) as handle:
        during = {n: t.clone() for n, t in model.state_dict().items()}
    after = model.state_dict()

    assert handle.k == 300 and handle.n_changed == 300
    params = dict(model.named_parameters())
    tied = {"lm_head.weight": "transformer.wte.weight"}
    for name, old in before.items():
        assert torch.equal(bits_of(after[name]), bits_of(old)), f"{name} not restored"
        source = tied.get(name, name)
        changed = (bits_of(during[name]) != bits_of(old)).reshape(-1)
        if source in selection:
            idx = selection[source]
            mask = torch.zeros(old.numel(), dtype=torch.bool)
            mask[idx] = True
            assert torch.equal(changed, mask), f"{name}: changed entries != selection"
            expected = expected_new_values(
                method, old.reshape(-1)[idx], before[source], source, seed=5
            )
            got = during[name].reshape(-1)[idx]
            if method == "gaussian_noise":
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(bits_of(got), bits_of(expected))
        else:
            assert not changed.any(), f"{name} changed although not selected"
    assert set(selection) <= set(params)


def test_gaussian_noise_is_seeded_and_scaled_by_tensor_std() -> None:
    torch.manual_seed(1)
    base = torch.randn(20000) * 0.02
    sel = Selection({"w": torch.arange(0, 20000, 2)})

    def noise_for(seed: int, extra: bool = False) -> torch.Tensor:
        w = base.clone()
        params = {"w": w, "other": torch.randn(10)} if extra else {"w": w}
        selection = Selection({**sel, "other": torch.arange(5)}) if extra else sel
        apply_perturbation(params, selection, "gaussian_noise", scale=3.0, seed=seed)
        return (w - base)[sel["w"]]

    a, b, c = noise_for(7), noise_for(7, extra=True), noise_for(8)
    assert torch.equal(a, b)  # same seed, same noise, whatever else is selected
    assert not torch.equal(a, c)
    z = (a / (3.0 * base.std(correction=0))).double()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.03


# --- n_changed makes do-nothing perturbations visible -------------------------------------


def test_n_changed_counts_bits_and_values() -> None:
    w = torch.tensor([0.0, 1.0, -0.0, 3.0])
    reporter = RecordingReporter()
    h = apply_perturbation({"w": w}, whole_selection(w), "zero", reporter=reporter)
    assert (h.k, h.n_changed, h.n_value_changed) == (4, 3, 2)  # -0.0 -> +0.0 changes bits only
    assert reporter.warnings and "1 of 4" in reporter.warnings[0]
    restore_exact(h)
    h = apply_perturbation({"w": w}, whole_selection(w), "sign_flip")
    assert (h.n_changed, h.n_value_changed) == (4, 2)
    restore_exact(h)
    h = apply_perturbation({"w": w}, whole_selection(w), "scale", scale=1.0)
    assert h.n_changed == 0
    restore_exact(h)
    # A constant tensor has std 0, so gaussian_noise (sigma = tensor std) cannot move it.
    c = torch.ones(5)
    h = apply_perturbation({"c": c}, Selection({"c": torch.arange(5)}), "gaussian_noise")
    assert h.n_changed == 0
    restore_exact(h)


def test_knobs_are_never_silently_ignored() -> None:
    w = torch.ones(3)
    with pytest.raises(InvalidInput, match="takes no scale"):
        apply_perturbation({"w": w}, whole_selection(w), "zero", scale=2.0)
    with pytest.raises(InvalidInput, match="takes no bit"):
        apply_perturbation({"w": w}, whole_selection(w), "sign_flip", bit=3)
    with pytest.raises(InvalidInput, match="needs a scale"):
        apply_perturbation({"w": w}, whole_selection(w), "scale")
    assert torch.equal(w, torch.ones(3))


def test_registry_lists_all_methods_and_rejects_unknown() -> None:
    assert PERTURBATION_METHODS.names() == [
        "bit_flip",
        "gaussian_noise",
        "scale",
        "sign_flip",
        "zero",
    ]
    from cwa.errors import UnknownName

    with pytest.raises(UnknownName, match="did you mean"):
        apply_perturbation({"w": torch.ones(2)}, whole_selection(torch.ones(2)), "sign_flp")


def test_plugin_method_with_wrong_output_leaves_model_untouched() -> None:
    w = torch.arange(6, dtype=torch.float32)
    v = torch.arange(4, dtype=torch.float32)
    bad = PerturbationMethod("bad", "returns float64", lambda x, ctx: x.double())
    with pytest.raises(InvalidInput, match="must return"):
        apply_perturbation(
            {"v": v, "w": w}, Selection({"v": torch.arange(2), "w": torch.arange(3)}), bad
        )
    assert torch.equal(w, torch.arange(6, dtype=torch.float32))
    assert torch.equal(v, torch.arange(4, dtype=torch.float32))


# --- exact restore in every storage dtype, special values included ------------------------


def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    smallest_subnormal = info.smallest_normal * info.eps  # 2**-149 / 2**-133 / 2**-24
    values = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1.5,
        2.0,
        3.0,
        info.max,
        -info.max,
        info.smallest_normal,
        smallest_subnormal,
        -smallest_subnormal,
        7 * smallest_subnormal,
        float("inf"),
        float("-inf"),
        float("nan"),
        1e-3,
        -123.25,
    ]
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    # A NaN with a non-default payload and a negative NaN, written as raw bits.
    nan_bits = {
        torch.float32: [0x7F800001, -0x003FFFFF],
        torch.bfloat16: [0x7F81, -0x007F],
        torch.float16: [0x7C01, -0x03FF],
    }[dtype]
    extra = torch.tensor(nan_bits, dtype=INT_OF[dtype]).view(dtype)
    return torch.cat([t, extra])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("zero", {}),
        ("sign_flip", {}),
        ("scale", {"scale": -3.0}),
        ("gaussian_noise", {}),
        ("bit_flip", {}),
        ("bit_flip", {"bit": 0}),
    ],
)
def test_restore_is_bit_exact_for_special_values(dtype, method, kwargs) -> None:
    w = special_values(dtype)
    assert bool(torch.isnan(w).any()) and (bits_of(w) != 0).any()
    reference = bits_of(w).clone()
    assert (bits_of(w) != bits_of(torch.zeros_like(w))).sum() > 0
    handle = apply_perturbation({"w": w}, whole_selection(w), method, **kwargs)
    assert not torch.equal(bits_of(w), reference)
    restore_exact(handle)
    assert torch.equal(bits_of(w), reference)
    assert handle.checksums_after == handle.checksums_before
