"""``cwa rank --topk N% --per tensor|row`` and ``cwa perturb --k-values N%`` through the CLI on
the toy GPT-2 (Conv1D weights [in, out], tied LM head): selections equal a brute-force sort per
group, the perturbed entries are exactly the expected ones and restored bit-exactly, controls
are matched per tensor (random_k per output row), bad combinations register nothing."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from _store_access import store_rows

from cwa.scorefile import open_scores


def _runs(store_path: Path) -> list[tuple]:
    return store_rows(store_path, "SELECT run_id, stage, status FROM runs ORDER BY run_id")


def _query(store_path: Path, sql: str, *params: object) -> list[tuple]:
    return store_rows(store_path, sql, list(params))


def _half_up(n: int, percent: Fraction) -> int:
    return int(Fraction(n) * percent / 100 + Fraction(1, 2))


def _output_axis(model: torch.nn.Module, name: str) -> int:
    """Brute force from the module types: 0 for Linear, 1 for Conv1D; tied weights via the head."""
    module = model.get_submodule(name.rpartition(".")[0])
    if type(module).__name__ == "Conv1D":
        return 1
    return 0  # nn.Linear, or the embedding tied to the Linear LM head (same [vocab, d] rows)


def _brute(scores: dict[str, np.ndarray], axes: dict[str, int] | None, percent: Fraction,
           bottom: bool) -> dict[str, set[int]]:  # fmt: skip
    """Per group (output row, or whole tensor when ``axes`` is None): a lexsort by (key, flat)."""
    out: dict[str, set[int]] = {}
    for name, values in scores.items():
        flat = np.arange(values.size).reshape(values.shape)
        if axes is None:
            groups = [(values.reshape(-1), flat.reshape(-1))]
        else:
            axis = axes[name]
            groups = list(zip(values if axis == 0 else values.T, flat if axis == 0 else flat.T,
                              strict=True))  # fmt: skip
        chosen: set[int] = set()
        for vals, idx in groups:
            v = vals.astype(np.float64)
            keep = ~np.isnan(v)
            order = np.lexsort((idx[keep], v[keep] if bottom else -v[keep]))
            chosen.update(int(i) for i in idx[keep][order[: _half_up(int(keep.sum()), percent)]])
        out[name] = chosen
    return out


def _load(path: Path) -> dict[str, np.ndarray]:
    with open_scores(path) as reader:
        return {n: reader.get(n).float().numpy() for n in reader.names()}


LINEAR = "attn_q,attn_k,attn_v,attn_o,mlp_up,mlp_down"


@pytest.mark.slow
def test_per_row_rank_and_perturb(cli, store_path, toy_env, one_thread) -> None:
    from cwa.models.loading import load_model
    from cwa.perturbation.apply import perturbed
    from cwa.ranking_prefix import CompactRanking
    from cwa.ranking_store import iter_selection

    assert cli("score", "--model", "toy", "--metric", "wanda").exit_code == 0
    before = _runs(store_path)
    for bad in (["--topk", "100", "--per", "row"], ["--topk", "50%", "--per", "rows"],
                ["--topk", "all", "--per", "tensor"]):  # fmt: skip
        result = cli("rank", "latest:score", *bad)
        assert result.exit_code != 0 and "Error:" in result.output and "--per" in result.output
        assert _runs(store_path) == before

    result = cli("rank", "latest:score", "--topk", "50%", "--bottom", "--per", "row")
    assert result.exit_code == 0, result.output
    (score_id, *_), (rank_id, *_) = _runs(store_path)
    score_path = store_path / "artifacts" / score_id / "scores.safetensors"
    artifact = store_path / "artifacts" / rank_id / "selection.bin"
    scores = _load(score_path)
    model = load_model("toy", dtype="float32", device="cpu").model
    axes = {name: _output_axis(model, name) for name in scores}
    assert 1 in axes.values() and 0 in axes.values()  # Conv1D and the tied Linear head
    expected = _brute(scores, axes, Fraction(50), bottom=True)
    got = {name: set(idx.tolist()) for name, idx in iter_selection(artifact)}
    assert got == expected
    sql = "SELECT config FROM runs WHERE run_id = ?"
    config = json.loads(_query(store_path, sql, rank_id)[0][0])
    assert config["per"] == "row" and config["selection"]["per"] == "row"
    assert config["selection"]["k"] == sum(len(v) for v in expected.values())
    table = _query(store_path, "SELECT parameter, flat_index FROM ranked_weights WHERE run_id = ?",
                   rank_id)  # fmt: skip
    assert table and all(int(i) in expected[p] for p, i in table)  # rows come from the selection

    before = _runs(store_path)
    for bad in ("100", "60%", "0%"):  # numbers per row are refused, and more than stored
        result = cli("perturb", rank_id, "--k-values", f"10%,{bad}", "--controls", "random_k",
                     "--eval", "perplexity")  # fmt: skip
        assert result.exit_code != 0 and "Error:" in result.output, (bad, result.output)
        assert _runs(store_path) == before

    # The 10% prefix is the brute-force 10% of each row; zeroing it touches exactly those.
    ranking = CompactRanking(artifact, score_path)
    k10 = ranking.resolve_k_values(["10%"], n_candidates=0, rank_id=rank_id)[0]
    prefix = ranking.prefix(k10)
    expected10 = _brute(scores, axes, Fraction(10), bottom=True)
    assert {n: set(i.tolist()) for n, i in prefix.items()} == {
        n: v for n, v in expected10.items() if v
    }
    params = dict(model.named_parameters())
    original = {n: params[n].detach().clone() for n in prefix}
    selection = {n: torch.from_numpy(i) for n, i in prefix.items()}
    with perturbed(model, selection, "zero"):
        for name, idx in selection.items():
            now = params[name].detach().reshape(-1)
            changed = now != original[name].reshape(-1)
            assert (now[idx] == 0).all()
            assert set(changed.nonzero().view(-1).tolist()) <= set(idx.tolist())
    for name in prefix:  # bit-exact restoration
        now = params[name].detach()
        assert torch.equal(now.view(torch.int32), original[name].view(torch.int32))

    result = cli("perturb", rank_id, "--k-values", "10%,50%", "--method", "zero",
                 "--controls", "random_k", "--seeds", "0,1", "--eval", "perplexity",
                 "--limit", "10")  # fmt: skip
    assert result.exit_code == 0, result.output
    perturb_id = _runs(store_path)[-1][0]
    conditions = _query(
        store_path,
        "SELECT condition_id, selection, k, restored FROM perturbation_conditions WHERE run_id = ?",
        perturb_id,
    )
    assert len(conditions) == 6 and all(c[3] for c in conditions)
    assert {c[2] for c in conditions} == {
        k10, sum(len(v) for v in expected.values())
    }
    groups: dict[str, dict[str, int]] = {}
    for cond, label, k in _query(
        store_path, "SELECT condition_id, group_key, k FROM condition_groups WHERE run_id = ?",
        perturb_id,
    ):
        groups.setdefault(cond, {})[label] = k
    for cond, _, k, _ in conditions:  # matched per tensor, as recorded
        treatment = next(c[0] for c in conditions if c[1] == "top_k" and c[2] == k)
        assert groups[cond] == groups[treatment], cond
        assert set(groups[cond]) <= set(scores)  # group keys are tensors
    perturb_config = json.loads(
        _query(store_path, "SELECT config FROM runs WHERE run_id = ?", perturb_id)[0][0]
    )
    assert perturb_config["mode"] == "tensor"


@pytest.mark.slow
def test_per_tensor_with_bottom_k_control(cli, store_path, toy_env, one_thread) -> None:
    from cwa.ranking_store import iter_selection

    assert cli("score", "--model", "toy", "--metric", "magnitude").exit_code == 0
    before = _runs(store_path)
    result = cli("rank", "latest:score", "--topk", "50%", "--per", "row")  # biases, norms
    assert result.exit_code != 0 and "not a 2-D Linear/Conv1D weight" in result.output
    assert _runs(store_path) == before
    result = cli("rank", "latest:score", "--topk", "30%", "--per", "tensor")
    assert result.exit_code == 0, result.output
    (score_id, *_), (rank_id, *_) = _runs(store_path)
    scores = _load(store_path / "artifacts" / score_id / "scores.safetensors")
    artifact = store_path / "artifacts" / rank_id / "selection.bin"
    got = {name: set(idx.tolist()) for name, idx in iter_selection(artifact)}
    expected = _brute(scores, None, Fraction(30), bottom=False)
    assert got == {n: v for n, v in expected.items()}
    result = cli("perturb", rank_id, "--k-values", "10%,30%", "--controls", "random_k,bottom_k",
                 "--eval", "perplexity", "--limit", "10")  # fmt: skip
    assert result.exit_code == 0, result.output
    perturb_id = _runs(store_path)[-1][0]
    rows = _query(store_path,
                  "SELECT g.condition_id, c.selection, c.k, g.group_key, g.k "
                  "FROM condition_groups g JOIN perturbation_conditions c "
                  "USING (run_id, condition_id) WHERE run_id = ?",
                  perturb_id)  # fmt: skip
    by_cond: dict[tuple[str, int], dict[str, int]] = {}
    for _, selection, k, label, n in rows:
        by_cond.setdefault((selection, k), {})[label] = n
    assert len(by_cond) == 6
    for (_, k), counts in by_cond.items():
        assert counts == by_cond[("top_k", k)]
    k10 = {n: _half_up(int((~np.isnan(v)).sum()), Fraction(10)) for n, v in scores.items()}
    small = min(k for _, k in by_cond)
    assert by_cond[("top_k", small)] == {n: c for n, c in k10.items() if c}
