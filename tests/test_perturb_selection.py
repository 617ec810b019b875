"""Selections: exact counts, scope respected, uniform random_k, brute-force-checked bottom_k."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput, NonFiniteError
from cwa.perturbation.apply import apply_perturbation, restore_exact
from cwa.perturbation.scope import ScopeEntry, scope_from_architecture, scope_from_params
from cwa.perturbation.selection import all_k, bottom_k, random_k, top_k


def masked_scope() -> list[ScopeEntry]:
    gen = torch.Generator().manual_seed(0)
    half = torch.rand(3000, generator=gen) < 0.5
    every_third = torch.arange(600) % 3 == 0
    return [
        ScopeEntry("a", 1000),
        ScopeEntry("b", 3000, half),
        ScopeEntry("c", 600, every_third),
        ScopeEntry("d", 5000),
    ]


def assert_valid(selection, scope) -> None:
    entries = {e.name: e for e in scope}
    for name, idx in selection.items():
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert bool((idx[1:] > idx[:-1]).all()), "indices must be sorted and unique"
        assert bool(entries[name].contains(idx).all()), f"{name}: element outside the scope"


# --- random_k ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 17, 500, 4000, 7000])
def test_random_k_exact_count_inside_scope(k: int) -> None:
    scope = masked_scope()
    selection = random_k(scope, k, seed=11)
    assert selection.k == k
    assert_valid(selection, scope)
    assert selection.info["sampler"] == {0: "none", 4000: "permutation", 7000: "permutation"}.get(
        k, "rejection"
    )


def test_random_k_is_seeded() -> None:
    scope = masked_scope()
    a, b, c = random_k(scope, 300, 5), random_k(scope, 300, 5), random_k(scope, 300, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(n not in c or not torch.equal(a[n], c[n]) for n in a)


def test_random_k_spreads_over_tensors_in_proportion_to_their_scope() -> None:
    scope = masked_scope()
    sizes = np.array([e.count for e in scope], dtype=np.float64)
    totals = np.zeros(len(scope))
    n_draws, k = 200, 100
    for seed in range(n_draws):
        selection = random_k(scope, k, seed)
        totals += [selection[e.name].numel() if e.name in selection else 0 for e in scope]
    expected = n_draws * k * sizes / sizes.sum()
    # Multinomial-ish counts: sd <= sqrt(expected); allow 5 sd.
    assert np.all(np.abs(totals - expected) <= 5 * np.sqrt(expected)), (totals, expected)


@pytest.mark.parametrize("k", [5, 40])  # rejection sampler, permutation sampler
def test_random_k_is_uniform_over_elements(k: int) -> None:
    mask = torch.zeros(90, dtype=torch.bool)
    mask[::3] = True
    scope = [ScopeEntry("x", 20), ScopeEntry("y", 90, mask)]  # 50 weights in scope
    hits = np.zeros(50)
    n_draws = 1500
    for seed in range(n_draws):
        sel = random_k(scope, k, seed)
        hits[sel.get("x", torch.empty(0, dtype=torch.int64)).numpy()] += 1
        hits[20 + sel.get("y", torch.empty(0, dtype=torch.int64)).numpy() // 3] += 1
    p = k / 50
    expected, sd = n_draws * p, np.sqrt(n_draws * p * (1 - p))
    assert np.all(np.abs(hits - expected) <= 5 * sd), (hits.min(), hits.max(), expected)


def test_random_k_scales_to_billions_without_materialising_the_scope() -> None:
    scope = [ScopeEntry(f"layer{i}", 218_000_000) for i in range(32)]  # ~7B weights, no tensors
    start = time.perf_counter()
    selection = random_k(scope, 100_000, seed=0)
    elapsed = time.perf_counter() - start
    assert selection.k == 100_000
    assert all(int(idx.max()) < 218_000_000 for idx in selection.values())
    assert len(selection) == 32
    assert elapsed < 20  # generous: it is O(k); a permutation of 7e9 would need 56 GB


def test_random_k_with_exclusion_never_overlaps_the_treatment() -> None:
    scope = masked_scope()
    treatment = random_k(scope, 3000, seed=1)
    for k, sampler in [(200, "rejection"), (3000, "permutation")]:
        control = random_k(scope, k, seed=2, exclude=treatment)
        assert control.k == k and control.info["overlap"] == "excluded"
        assert control.info["sampler"] == sampler
        assert_valid(control, scope)
        for name, idx in control.items():
            if name in treatment:
                assert not bool(torch.isin(idx, treatment[name]).any())
    with pytest.raises(InvalidInput, match="eligible"):
        random_k(scope, sum(e.count for e in scope) - 2999, seed=0, exclude=treatment)


def test_random_k_refuses_k_larger_than_the_scope() -> None:
    with pytest.raises(InvalidInput, match="lower k"):
        random_k([ScopeEntry("a", 10)], 11, seed=0)


# --- bottom_k ------------------------------------------------------------------------------


def brute_force_bottom(scores, scope, k, zeros="exclude", absolute=False):
    rows = []
    for position, entry in enumerate(scope):
        values = scores[entry.name].reshape(-1).double()
        if absolute:
            values = values.abs()
        for flat in range(entry.numel):
            if entry.mask is not None and not bool(entry.mask[flat]):
                continue
            value = float(values[flat])
            if zeros == "exclude" and value == 0:
                continue
            rows.append((value, position, flat))
    rows.sort()
    chosen: dict[str, list[int]] = {}
    for _, position, flat in rows[:k]:
        chosen.setdefault(scope[position].name, []).append(flat)
    return {name: sorted(v) for name, v in chosen.items()}


def tie_heavy_scores(scope, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Small integers: many ties and many exact zeros.
    return {e.name: torch.randint(0, 6, (e.numel,), generator=gen).float() for e in scope}


@pytest.mark.parametrize("zeros", ["exclude", "include"])
@pytest.mark.parametrize("k", [1, 50, 700, 2000])
def test_bottom_k_matches_brute_force_with_ties_and_zeros(zeros: str, k: int) -> None:
    scope = masked_scope()[:3]
    scores = tie_heavy_scores(scope)
    # Feed the tensors in a different order than the scope: ties still follow the scope order.
    shuffled = [(n, scores[n]) for n in ("c", "a", "b")]
    selection = bottom_k(shuffled, scope, k, zeros=zeros)
    expected = brute_force_bottom(scores, scope, k, zeros=zeros)
    assert selection.k == k
    assert {n: v.tolist() for n, v in selection.items()} == expected
    assert selection.info["zeros"] == zeros
    n_zero = sum(
        int(((scores[e.name] == 0) & (e.mask if e.mask is not None else True)).sum()) for e in scope
    )
    assert selection.info["n_zero_scores_in_scope"] == n_zero


@pytest.mark.parametrize("key", ["abs", "value"])
def test_bottom_k_with_signed_scores_follows_the_key(key: str) -> None:
    """Signed scores (a Hessian diagonal) are well defined under both keys: abs takes the
    weights nearest zero curvature, value the most negative ones (brute-force sort)."""
    scope = masked_scope()
    gen = torch.Generator().manual_seed(3)
    scores = {e.name: torch.randn(e.numel, generator=gen) for e in scope}
    selection = bottom_k(scores, scope, 123, key=key)
    expected = brute_force_bottom(scores, scope, 123, absolute=key == "abs")
    assert {n: v.tolist() for n, v in selection.items()} == expected
    assert selection.info["key"] == key
    chosen = torch.cat([scores[n][v] for n, v in selection.items()])
    if key == "abs":
        assert chosen.abs().max() < 0.1  # 123 of ~500 standard normals nearest 0
    else:
        assert chosen.max() < -0.5  # the most negative values
    # the older spelling
    legacy = bottom_k(scores, scope, 123, absolute=True)
    assert {n: v.tolist() for n, v in legacy.items()} == brute_force_bottom(
        scores, scope, 123, absolute=True
    )


def test_bottom_k_errors() -> None:
    scope = [ScopeEntry("a", 4), ScopeEntry("b", 3)]
    scores = {"a": torch.tensor([0.0, 0.0, 1.0, 2.0]), "b": torch.tensor([0.0, 3.0, 4.0])}
    with pytest.raises(InvalidInput, match="zeros='include'"):
        bottom_k(scores, scope, 5)
    assert bottom_k(scores, scope, 5, zeros="include").k == 5
    with pytest.raises(InvalidInput, match="no scores for 1 tensor"):
        bottom_k({"a": scores["a"]}, scope, 1)
    with pytest.raises(NonFiniteError):
        bottom_k({"a": torch.tensor([float("nan"), 1, 1, 1]), "b": scores["b"]}, scope, 1)
    with pytest.raises(InvalidInput, match="elements"):
        bottom_k({"a": torch.ones(5), "b": scores["b"]}, scope, 1)


# --- top_k and all_k ------------------------------------------------------------------------


def test_top_k_groups_rows_and_keeps_exactly_k() -> None:
    names = ["b", "a", "b", "a", "c", "b"]
    flats = [7, 3, 1, 0, 9, 2]
    selection = top_k(names, flats, k=5)
    assert {n: v.tolist() for n, v in selection.items()} == {"a": [0, 3], "b": [1, 7], "c": [9]}
    assert selection.k == 5 and selection.kind == "top_k"
    assert top_k(np.array(names), torch.tensor(flats)).k == 6
    with pytest.raises(InvalidInput, match="twice"):
        top_k(["a", "a"], [1, 1])
    with pytest.raises(InvalidInput, match="outside the perturbation scope"):
        top_k(["a"], [5], scope=[ScopeEntry("a", 5)])
    mask = torch.tensor([True, False, True])
    with pytest.raises(InvalidInput, match="outside"):
        top_k(["a"], [1], scope=[ScopeEntry("a", 3, mask)])


def test_all_k_is_every_weight_in_scope() -> None:
    scope = masked_scope()
    selection = all_k(scope)
    assert selection.k == sum(e.count for e in scope)
    assert torch.equal(selection["b"], scope[1].mask.nonzero().view(-1))
    assert torch.equal(selection["a"], torch.arange(1000))


# --- matched controls on a real model --------------------------------------------------------


def test_controls_perturb_exactly_as_many_weights_as_the_treatment() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 10))
    scope = scope_from_params(model, ["0.weight", "1.weight"])
    scores = {n: (p * p).detach() for n, p in model.named_parameters()}
    flat_scores = torch.cat([scores["0.weight"].view(-1), scores["1.weight"].view(-1)])
    order = torch.argsort(flat_scores, descending=True, stable=True)[:37]
    names = np.where(order.numpy() < 600, "0.weight", "1.weight")
    flats = np.where(order.numpy() < 600, order.numpy(), order.numpy() - 600)
    treatment = top_k(names, flats, scope=scope)
    controls = [random_k(scope, treatment.k, seed=s) for s in range(3)]
    controls.append(bottom_k(scores, scope, treatment.k))
    for selection in [treatment, *controls]:
        handle = apply_perturbation(model, selection, "sign_flip")
        assert handle.k == handle.n_changed == 37
        restore_exact(handle)
        assert set(selection) <= {"0.weight", "1.weight"}  # biases are outside the scope


# --- scopes from an architecture map (duck-typed to the models contract) ---------------------


def fake_architecture():
    shapes = {"h.0.attn.c_attn.weight": (4, 12), "h.0.mlp.c_fc.weight": (4, 8), "ln.weight": (4,)}

    def component_mask(name, components):
        mask = torch.zeros(shapes[name], dtype=torch.bool)
        if name == "h.0.attn.c_attn.weight":
            for i, comp in enumerate(("attn_q", "attn_k", "attn_v")):
                if components is None or comp in components:
                    mask[:, 4 * i : 4 * (i + 1)] = True
            return mask
        comp = "mlp_up" if "c_fc" in name else "norm"
        return (
            torch.ones(shapes[name], dtype=torch.bool)
            if components is None or comp in components
            else mask
        )

    def select(layers=None, components=None):
        return [n for n in shapes if bool(component_mask(n, components).any())]

    def scope_mask(name, layers=None, components=None):
        mask = component_mask(name, components)
        return None if bool(mask.all()) else mask

    def head_elements(layer, head, components=("attn_q", "attn_k", "attn_v", "attn_o")):
        mask = torch.zeros(shapes["h.0.attn.c_attn.weight"], dtype=torch.bool)
        for i, comp in enumerate(("attn_q", "attn_k", "attn_v")):
            if comp in components:
                mask[:, 4 * i + 2 * head : 4 * i + 2 * head + 2] = True  # 2 heads of dim 2
        return {"h.0.attn.c_attn.weight": mask}

    params = {n: SimpleNamespace(numel=int(np.prod(s))) for n, s in shapes.items()}
    return SimpleNamespace(
        params=params, select=select, scope_mask=scope_mask, head_elements=head_elements
    )


def test_scope_from_architecture_components_and_heads() -> None:
    arch = fake_architecture()
    full = scope_from_architecture(arch)
    assert [(e.name, e.count, e.mask is None) for e in full] == [
        ("h.0.attn.c_attn.weight", 48, True),
        ("h.0.mlp.c_fc.weight", 32, True),
        ("ln.weight", 4, True),
    ]
    q_only = scope_from_architecture(arch, components=["attn_q"])
    assert [(e.name, e.count) for e in q_only] == [("h.0.attn.c_attn.weight", 16)]
    expected_q = torch.zeros(4, 12, dtype=torch.bool)
    expected_q[:, :4] = True
    assert torch.equal(q_only[0].mask, expected_q.view(-1))
    head1_q = scope_from_architecture(arch, components=["attn_q"], heads=[(0, 1)])
    expected = torch.zeros(4, 12, dtype=torch.bool)
    expected[:, 2:4] = True
    assert torch.equal(head1_q[0].mask, expected.view(-1))
    selection = random_k(head1_q, 8, seed=0)
    assert torch.equal(selection["h.0.attn.c_attn.weight"], expected.view(-1).nonzero().view(-1))
    with pytest.raises(InvalidInput, match="attention component"):
        scope_from_architecture(arch, components=["mlp_up"], heads=[(0, 0)])


def test_scope_from_the_real_architecture_map_matches_component_ids() -> None:
    architecture = pytest.importorskip("cwa.models.architecture")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=97)
    model = GPT2LMHeadModel(config)
    arch = architecture.build_architecture_map(model)
    q_index = architecture.COMPONENTS.index("attn_q")
    scope = scope_from_architecture(arch, layers=[1], components=["attn_q"])
    assert [e.name for e in scope] == [
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.bias",
    ]
    for entry in scope:
        is_q = (arch.component_ids(entry.name) == q_index).reshape(-1)
        assert torch.equal(entry.mask, is_q)  # GPT-2 c_attn is [Q|K|V] along the last dim
    selection = random_k(scope, 50, seed=0)
    for name, idx in selection.items():
        assert bool((arch.component_ids(name).reshape(-1)[idx] == q_index).all())
