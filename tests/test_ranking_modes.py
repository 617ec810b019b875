"""Streaming rankings against a brute-force full sort, ties included, in every mode."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

from cwa.errors import InvalidInput  # noqa: E402
from cwa.models.architecture import (  # noqa: E402
    COMPONENTS,
    build_architecture_map,
    resolve_components,
)
from cwa.ranking import RANK_MODES, RunningTopK, rank_scores, rank_tensors, ranking_frame  # noqa: E402
from cwa.scorefile import write_score_file  # noqa: E402


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=24, n_positions=8,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def llama_gqa():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=24,
                         max_position_embeddings=8, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module", params=[gpt2, llama_gqa], ids=["gpt2", "llama_gqa"])
def scored(request, tmp_path_factory):
    """A model, its map and a score file full of ties (integers 0..4), with NaN holes."""
    model = request.param()
    arch = build_architecture_map(model)
    generator = torch.Generator().manual_seed(1)
    scores = {}
    for name, param in model.named_parameters():
        values = torch.randint(0, 5, param.shape, generator=generator).float()
        if name.endswith("mlp.c_fc.weight") or name.endswith("up_proj.weight"):
            values[0] = float("nan")  # "not scored" elements are never ranked
        scores[name] = values
    path = tmp_path_factory.mktemp("rank") / "scores.safetensors"
    write_score_file(path, scores)
    return model, arch, scores, path


def brute_force(
    arch, scores, k, mode, bottom, layers=None, components=None, by="value", grouping="kv"
):
    """Definition by full sort: key (score desc | asc, parameter order, flat index).

    Head groups, written out independently: ``kv`` = the query heads of key-value head J (q, o)
    with that key-value head (k, v); ``component`` = (component, head in its own numbering).
    """
    comps = resolve_components(components)
    scope = set(arch.select(layers=layers, components=comps))
    groups: dict[str, list] = {}
    for position, name in enumerate(arch.params):
        if name not in scores or name not in scope:
            continue
        info = arch.params[name]
        mask = arch.scope_mask(name, layers=layers, components=comps)
        in_scope = [True] * info.numel if mask is None else mask.reshape(-1).tolist()
        component_ids = arch.component_ids(name).reshape(-1).tolist()
        head_ids = arch.head_ids(name).reshape(-1).tolist()
        layer = "none" if info.layer is None else info.layer
        for flat, value in enumerate(scores[name].reshape(-1).tolist()):
            if not in_scope[flat] or math.isnan(value):
                continue
            if mode == "head":
                if head_ids[flat] < 0:
                    continue
                component = COMPONENTS[component_ids[flat]]
                if grouping == "component":
                    group = f"layer={layer},{component},head={head_ids[flat]}"
                elif component in ("attn_k", "attn_v"):
                    group = f"layer={layer},kv_head={head_ids[flat]}"
                else:  # query head h reads key-value head h // (n_heads / n_kv_heads)
                    kv = head_ids[flat] // (arch.n_heads // arch.n_kv_heads)
                    group = f"layer={layer},kv_head={kv}"
            else:
                group = {
                    "global": "all",
                    "tensor": name,
                    "layer": f"layer={layer}",
                    "component": COMPONENTS[component_ids[flat]],
                }[mode]
            sort_value = abs(value) if by == "abs" else value
            key = (sort_value if bottom else -sort_value, position, flat)
            groups.setdefault(group, []).append((key, name, flat, value))
    rows = []
    for group, entries in groups.items():
        entries.sort()
        for rank, (_, name, flat, value) in enumerate(entries[:k], start=1):
            rows.append((group, rank, name, flat, value))
    return rows


def simplified(rows):
    return [(r["group"], r["rank"], r["parameter"], r["flat_index"], r["score"]) for r in rows]


@pytest.mark.parametrize("mode", RANK_MODES)
@pytest.mark.parametrize("bottom", [False, True])
@pytest.mark.parametrize("k", [1, 7, 5000])
def test_every_mode_equals_brute_force_sort(scored, mode, bottom, k):
    _, arch, scores, path = scored
    rows = rank_scores(path, arch, k=k, mode=mode, bottom=bottom)
    assert simplified(rows) == brute_force(arch, scores, k, mode, bottom)


@pytest.mark.parametrize("mode", RANK_MODES)
def test_scoped_rankings_equal_brute_force(scored, mode):
    _, arch, scores, path = scored
    scope = {"layers": [1], "components": ["attn_q", "attn_v", "mlp_down"]}
    rows = rank_scores(path, arch, k=9, mode=mode, **scope)
    assert rows and simplified(rows) == brute_force(arch, scores, 9, mode, False, **scope)
    assert {r["component"] for r in rows} <= {"attn_q", "attn_v", "mlp_down"}
    assert {r["layer"] for r in rows} == {1}


def test_row_metadata_and_weight_values(scored):
    model, arch, _, path = scored
    weights = dict(model.named_parameters())
    rows = rank_scores(path, arch, k=300, mode="global", weights=weights)
    for row in rows:
        param = weights[row["parameter"]]
        flat = row["flat_index"]
        assert row["weight_value"] == float(param.detach().reshape(-1)[flat])
        if param.dim() == 2:
            assert row["row"] * param.shape[1] + row["column"] == flat
        else:
            assert (row["row"], row["column"]) == (flat, None)
        assert (
            row["component"]
            == COMPONENTS[int(arch.component_ids(row["parameter"]).reshape(-1)[flat])]
        )
        head = int(arch.head_ids(row["parameter"]).reshape(-1)[flat])
        assert row["head"] == (None if head < 0 else head)
    frame = ranking_frame(rows)
    assert frame.height == 300 and frame["rank"].to_list() == list(range(1, 301))


def test_rankings_are_deterministic_and_never_concatenate_scores(scored, monkeypatch):
    _, arch, _, path = scored
    first = rank_scores(path, arch, k=50, mode="head")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cat over scores")

    monkeypatch.setattr(torch, "cat", forbidden)
    assert rank_scores(path, arch, k=50, mode="head") == first


def test_all_equal_scores_break_ties_by_parameter_then_index(tmp_path):
    model = gpt2()
    arch = build_architecture_map(model)
    scores = {n: torch.ones(p.shape) for n, p in model.named_parameters()}
    write_score_file(tmp_path / "s", scores)
    first_name = next(iter(scores))
    rows = rank_scores(tmp_path / "s", arch, k=10, mode="global")
    assert [(r["parameter"], r["flat_index"]) for r in rows] == [(first_name, i) for i in range(10)]
    rows = rank_scores(tmp_path / "s", arch, k=3, mode="global", bottom=True)
    assert [(r["parameter"], r["flat_index"]) for r in rows] == [(first_name, i) for i in range(3)]


def test_running_topk_matches_sort_on_random_streams():
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = int(rng.integers(1, 40))
        top = RunningTopK(k)
        everything = []
        for position in range(int(rng.integers(1, 6))):
            keys = rng.integers(0, 6, size=int(rng.integers(0, 60))).astype(np.float32)
            flats = np.sort(rng.choice(1000, size=keys.size, replace=False))
            top.offer(position, keys, flats)
            everything += [(-float(v), position, int(f)) for v, f in zip(keys, flats, strict=True)]
        expected = sorted(everything)[:k]
        got = list(
            zip((-top.keys).tolist(), top.positions.tolist(), top.flats.tolist(), strict=True)
        )
        assert got == expected, trial
        assert top.nbytes() <= k * 20


def test_invalid_requests_are_refused(scored, tmp_path):
    model, arch, _, path = scored
    with pytest.raises(InvalidInput, match="mode"):
        rank_scores(path, arch, k=3, mode="neuron")
    with pytest.raises(InvalidInput, match="positive"):
        rank_scores(path, arch, k=0)
    write_score_file(tmp_path / "other", {"not.a.parameter": torch.zeros(3)})
    with pytest.raises(InvalidInput, match="lacks"):
        rank_scores(tmp_path / "other", arch, k=3)


@pytest.fixture(scope="module")
def signed_scores(tmp_path_factory):
    """GQA Llama with signed scores (integers -4..4, many ties), as a Hessian diagonal gives."""
    model = llama_gqa()
    arch = build_architecture_map(model)
    generator = torch.Generator().manual_seed(7)
    scores = {
        name: torch.randint(-4, 5, param.shape, generator=generator).float()
        for name, param in model.named_parameters()
    }
    path = tmp_path_factory.mktemp("signed") / "scores.safetensors"
    write_score_file(path, scores)
    return arch, scores, path


@pytest.mark.parametrize("mode", RANK_MODES)
@pytest.mark.parametrize("by", ["abs", "value"])
@pytest.mark.parametrize("bottom", [False, True])
def test_ranking_key_abs_and_value_equal_brute_force(signed_scores, mode, by, bottom):
    arch, scores, path = signed_scores
    rows = rank_scores(path, arch, k=11, mode=mode, bottom=bottom, by=by)
    assert simplified(rows) == brute_force(arch, scores, 11, mode, bottom, by=by)
    if by == "abs" and not bottom:  # raw (negative) scores are kept in the rows
        assert any(r["score"] < 0 for r in rows)


def test_head_grouping_per_component_equals_brute_force(scored):
    _, arch, scores, path = scored
    rows = rank_scores(path, arch, k=3, mode="head", head_grouping="component")
    assert simplified(rows) == brute_force(arch, scores, 3, "head", False, grouping="component")


def test_gqa_kv_group_holds_its_query_heads_and_kv_head():
    model = llama_gqa()  # 4 query heads, 2 key-value heads: kv head 1 serves query heads 2, 3
    arch = build_architecture_map(model)
    scores = {n: torch.ones(p.shape) for n, p in model.named_parameters()}
    rows = rank_tensors(scores.items(), arch, k=10**6, mode="head")
    group = [r for r in rows if r["group"] == "layer=0,kv_head=1"]
    heads = {(r["component"], r["head"]) for r in group}
    assert heads == {("attn_q", 2), ("attn_q", 3), ("attn_o", 2), ("attn_o", 3),
                     ("attn_k", 1), ("attn_v", 1)}  # fmt: skip
    head_dim = 16 // 4
    assert len(group) == 2 * (2 * head_dim * 16) + 2 * (head_dim * 16)
    expected_groups = {f"layer={la},kv_head={j}" for la in (0, 1) for j in (0, 1)}
    assert {r["group"] for r in rows} == expected_groups
