"""Matched controls: signed metrics, per-group counts in every rank mode, GQA head groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _store_access import store_rows

from cwa.ranking import RANK_MODES
from cwa.store import Store


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _score(cli, world, *extra: str) -> str:
    out = _ok(
        cli("--json", "score", "--model", str(world["model"]), "--data", str(world["text"]),
            "--n-samples", "8", "--seq-len", "16", "--batch-size", "4", *extra)
    )  # fmt: skip
    return out["runs"][0]["run_id"]


def _group_counts(store_path: Path, run_id: str) -> dict[str, dict[str, int]]:
    """selection label -> {group: k} from condition_groups (one seed per selection)."""
    rows = store_rows(
        store_path,
        "SELECT pc.selection, g.group_key, g.k FROM condition_groups g JOIN "
        "perturbation_conditions pc USING (run_id, condition_id) WHERE run_id = ? "
        "AND coalesce(pc.seed, 0) = 0",
        [run_id],
    )
    out: dict[str, dict[str, int]] = {}
    for selection, group, k in rows:
        out.setdefault(selection, {})[group] = k
    return out


@pytest.mark.parametrize("metric", ["hutchinson_diag", "obd"])
def test_signed_metrics_perturb_with_default_controls(cli, tiny_world, store_path, metric):
    score_id = _score(cli, tiny_world, "--metric", metric, "--probes", "2")
    with Store(store_path).read() as con:
        (config,) = con.execute("SELECT config FROM runs WHERE run_id = ?", [score_id]).fetchone()
    assert json.loads(config)["signed"] is True
    from safetensors import safe_open

    with safe_open(str(store_path / "artifacts" / score_id / "scores.safetensors"), "pt") as f:
        assert any(bool((f.get_tensor(n) < 0).any()) for n in f.keys())  # really signed
    rank = _ok(cli("--json", "rank", score_id, "-k", "40"))["runs"][0]["run_id"]
    ((rank_config,),) = store_rows(store_path, "SELECT config FROM runs WHERE run_id = ?", [rank])
    assert json.loads(rank_config)["by"] == "abs"
    # ranked by |score|: the stored raw scores include negative ones among the top
    query = "SELECT score FROM ranked_weights WHERE run_id = ? ORDER BY rank"
    scores = [s for (s,) in store_rows(store_path, query, [rank])]
    assert [abs(s) for s in scores] == sorted((abs(s) for s in scores), reverse=True)
    out = _ok(cli("--json", "perturb", rank, "--method", "zero",
                  "--eval", f"perplexity:{tiny_world['text']}"))  # fmt: skip
    run_id = out["runs"][0]["run_id"]
    counts = _group_counts(store_path, run_id)
    assert counts == {"top_k": {"all": 40}, "random_k": {"all": 40}, "bottom_k": {"all": 40}}
    ((key,),) = store_rows(store_path, "SELECT config->>'key' FROM runs WHERE run_id = ?", [run_id])
    assert key == "abs"


@pytest.mark.parametrize("mode", RANK_MODES)
def test_controls_match_the_treatment_in_every_group(cli, tiny_world, store_path, mode):
    score_id = _score(cli, tiny_world)
    rank = _ok(cli("--json", "rank", score_id, "-k", "3", "--mode", mode))["runs"][0]["run_id"]
    ranked = dict(store_rows(store_path, "SELECT group_key, count(*) FROM ranked_weights "
                             "WHERE run_id = ? GROUP BY ALL", [rank]))  # fmt: skip
    assert len(ranked) >= (1 if mode == "global" else 2)
    out = _ok(cli("--json", "perturb", rank, "--controls", "random_k,bottom_k", "--seeds", "0,1",
                  "--eval", f"perplexity:{tiny_world['text']}"))  # fmt: skip
    run_id = out["runs"][0]["run_id"]
    counts = _group_counts(store_path, run_id)
    assert counts["top_k"] == ranked
    assert counts["random_k"] == ranked and counts["bottom_k"] == ranked
    # the view shows treatment and control side by side, equal, for every seed
    view = store_rows(store_path, "SELECT selection, seed, group_key, treatment_k, selected_k "
                      "FROM condition_group_counts WHERE run_id = ?", [run_id])  # fmt: skip
    assert len(view) == len(ranked) * (1 + 2 + 1)  # top_k, random_k x 2 seeds, bottom_k
    assert all(t == s for *_, t, s in view)
    roles = dict(
        store_rows(
            store_path,
            "SELECT selection, any_value(role) FROM perturbation_conditions WHERE run_id = ? "
            "GROUP BY ALL",
            [run_id],
        )
    )
    assert roles == {"top_k": "treatment", "random_k": "control", "bottom_k": "control"}


def _llama_gqa():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                         max_position_embeddings=16, tie_word_embeddings=False,
                         attn_implementation="eager")  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("mode", RANK_MODES)
@pytest.mark.parametrize("key", ["abs", "value"])
def test_grouped_bottom_k_equals_brute_force_per_group(mode, key):
    """bottom_k of a per-group ranking = per group, the n least by key (full sort)."""
    from cwa.models.architecture import build_architecture_map
    from cwa.perturbation.groups import element_groups, group_scopes
    from cwa.perturbation.scope import scope_from_params
    from cwa.perturbation.selection import bottom_k_by_group, random_k_by_group

    model = _llama_gqa()
    arch = build_architecture_map(model)
    scope = scope_from_params(model)
    groups = group_scopes(arch, scope, mode)
    gen = torch.Generator().manual_seed(5)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    counts = {label: 1 + i % 4 for i, label in enumerate(groups)}
    chosen = bottom_k_by_group(((e.name, scores[e.name]) for e in scope), groups, counts, key=key)
    # the reader form works through buckets of groups sharing tensors: the same selection
    reader = lambda entries: ((e.name, scores[e.name]) for e in entries)  # noqa: E731
    by_bucket = bottom_k_by_group(reader, groups, counts, key=key)
    assert {n: v.tolist() for n, v in by_bucket.items()} == {
        n: v.tolist() for n, v in chosen.items()
    }
    # brute force: every element's group label from element_groups, one full sort per group
    expected: dict[str, list[tuple]] = {}
    for position, (name, s) in enumerate(scores.items()):
        labels, ids = element_groups(arch, name, mode)
        flat = s.reshape(-1)
        for i in range(flat.numel()):
            label = labels[0] if ids is None else (labels[ids[i]] if ids[i] >= 0 else None)
            if label is None:
                continue
            value = abs(float(flat[i])) if key == "abs" else float(flat[i])
            expected.setdefault(label, []).append((value, position, i, name))
    want: dict[str, list[int]] = {}
    for label, rows in expected.items():
        for _, _, i, name in sorted(rows)[: counts[label]]:
            want.setdefault(name, []).append(i)
    assert {n: v.tolist() for n, v in chosen.items()} == {n: sorted(v) for n, v in want.items()}
    drawn = random_k_by_group(groups, counts, seed=3)
    from cwa.perturbation.groups import count_by_group

    assert count_by_group(drawn, arch, mode) == counts
    assert count_by_group(chosen, arch, mode) == counts


def test_gqa_head_group_equals_masking_its_query_heads():
    """Zeroing every element of kv group J (its query heads' q rows and o columns, k/v head J)
    equals running the model with exactly those query heads' outputs masked."""
    from cwa.models.architecture import build_architecture_map
    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.groups import group_scopes
    from cwa.perturbation.scope import scope_from_params

    model = _llama_gqa()
    arch = build_architecture_map(model)
    assert (arch.n_heads, arch.n_kv_heads) == (4, 2)
    head_dim = 16 // 4
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    groups = group_scopes(arch, scope_from_params(model), "head")
    assert set(groups) == {f"layer={la},kv_head={j}" for la in (0, 1) for j in (0, 1)}

    def masked_logits(layer: int, q_heads: list[int]) -> torch.Tensor:
        o_proj = model.model.layers[layer].self_attn.o_proj

        def hook(module, args):
            x = args[0].clone()
            for h in q_heads:
                x[..., h * head_dim : (h + 1) * head_dim] = 0
            return (x,)

        handle = o_proj.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            handle.remove()

    with torch.no_grad():
        clean = model(ids).logits
    for layer in (0, 1):
        for kv in (0, 1):
            selection = {e.name: e.flat_positions() for e in groups[f"layer={layer},kv_head={kv}"]}
            with perturbed(model, selection, "zero"), torch.no_grad():
                zeroed = model(ids).logits
            expected = masked_logits(layer, [2 * kv, 2 * kv + 1])
            assert not torch.allclose(zeroed, clean)
            torch.testing.assert_close(zeroed, expected, rtol=1e-5, atol=1e-6)
            # the old numbering (query head kv + kv head kv) is not a head mask
            wrong = masked_logits(layer, [kv])
            assert not torch.allclose(zeroed, wrong, atol=1e-4)


def test_perturb_heads_scope_is_the_kv_group_of_the_head_ranking():
    """--heads L.J (kv_groups=True) covers exactly the elements of head group layer=L,kv_head=J."""
    from cwa.models.architecture import build_architecture_map
    from cwa.perturbation.groups import group_scopes
    from cwa.perturbation.scope import scope_from_architecture, scope_from_params

    model = _llama_gqa()
    arch = build_architecture_map(model)
    groups = group_scopes(arch, scope_from_params(model), "head")
    for layer in (0, 1):
        for kv in (0, 1):
            scope = scope_from_architecture(arch, heads=[(layer, kv)], kv_groups=True)
            got = {e.name: e.flat_positions().tolist() for e in scope}
            want = {
                e.name: e.flat_positions().tolist() for e in groups[f"layer={layer},kv_head={kv}"]
            }
            assert got == want
    from cwa.errors import InvalidInput

    with pytest.raises(InvalidInput, match="out of range"):
        scope_from_architecture(arch, heads=[(0, 2)], kv_groups=True)  # only 2 kv heads


def test_grouped_bottom_k_fills_a_group_of_zero_scores_in_scope_order():
    """A group whose scores are (mostly) zero -- a bias with no gradient -- still gets the
    treatment's count: every non-zero score first, then zero-score weights in scope order."""
    from cwa.perturbation.scope import ScopeEntry
    from cwa.perturbation.selection import bottom_k_by_group

    scores = {"a": torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]), "b": torch.tensor([3.0, 1.0, 2.0])}
    groups = {"ga": [ScopeEntry("a", 5)], "gb": [ScopeEntry("b", 3)]}
    chosen = bottom_k_by_group(scores.items(), groups, {"ga": 3, "gb": 2}, key="abs")
    assert {n: v.tolist() for n, v in chosen.items()} == {"a": [0, 1, 2], "b": [1, 2]}
    assert chosen.info["zero_filled"] == {"ga": 2}
    from cwa.errors import InvalidInput

    with pytest.raises(InvalidInput, match="candidate weights"):
        bottom_k_by_group(scores.items(), groups, {"ga": 6, "gb": 1}, key="abs")
