"""One contract test over every registered metric, perturbation method, selection and task,
and plugins of each kind used end to end through the CLI (or refused with a clear error)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _store_access import store_rows

from cwa.errors import InvalidInput, UnknownName
from cwa.evaluation.tasks import TASKS
from cwa.metrics import METRICS
from cwa.perturbation import PERTURBATION_METHODS, SELECTIONS


def _tiny_gqa():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                         max_position_embeddings=16, tie_word_embeddings=False)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_contract(name: str) -> None:
    from cwa.metrics import get_metric
    from cwa.metrics.base import MetricSpec

    spec = get_metric(name)
    assert isinstance(spec, MetricSpec) and spec.name == name
    assert dict(METRICS.describe())[name] == spec.description  # listing without imports agrees
    assert isinstance(spec.version, str) and spec.version
    assert callable(spec.compute) and isinstance(spec.signed, bool)
    assert isinstance(spec.needs_data, bool) and isinstance(dict(spec.options), dict)


@pytest.mark.parametrize("name", PERTURBATION_METHODS.names())
def test_method_contract(name: str) -> None:
    from cwa.perturbation.apply import get_method
    from cwa.perturbation.methods import MethodContext, PerturbationMethod

    method = get_method(name)
    assert isinstance(method, PerturbationMethod) and method.name == name
    for flag in ("takes_scale", "requires_scale", "takes_bit", "stochastic", "nonnegative_scale"):
        assert isinstance(getattr(method, flag), bool), flag
    assert not method.requires_scale or method.takes_scale
    tensor = torch.linspace(-1.5, 1.5, 40).reshape(5, 8)
    scale = method.resolve_scale(0.5 if method.requires_scale else None)
    bit = method.resolve_bit(None, tensor.dtype)
    assert (bit is None) == (not method.takes_bit)
    if not method.takes_scale:
        with pytest.raises(InvalidInput):
            method.resolve_scale(2.0)
    originals = tensor.reshape(-1)[::3].clone()

    def run(seed: int) -> torch.Tensor:
        ctx = MethodContext(name, tensor, scale, bit, seed)
        return method.compute(originals.clone(), ctx)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bit patterns: NaN == NaN
        return torch.equal(a.view(torch.int32), b.view(torch.int32))

    out = run(0)
    assert out.dtype == originals.dtype and out.shape == originals.shape
    assert not same(out, originals)  # every built-in method changes these weights
    assert same(run(0), out)  # deterministic for a seed
    assert same(run(1), out) != method.stochastic  # only stochastic methods use the seed


@pytest.mark.parametrize("name", SELECTIONS.names())
def test_selection_contract(name: str) -> None:
    """Every selection builds a valid selection on a tiny GQA model in every rank mode; matched
    controls hold exactly the treatment's count in every group."""
    import polars as pl

    from cwa.models.architecture import build_architecture_map
    from cwa.perturbation.contract import SelectionRequest, SelectionSpec, parse_selection
    from cwa.perturbation.groups import count_by_group, group_scopes
    from cwa.perturbation.scope import scope_from_params
    from cwa.ranking import RANK_MODES, rank_tensors

    parsed = parse_selection(name)
    spec = parsed.spec
    assert isinstance(spec, SelectionSpec) and spec.name == name
    assert spec.role in ("treatment", "control")
    if spec.takes_param:
        pytest.skip("selections with a parameter are checked by their owner's tests")
    model = _tiny_gqa()
    arch = build_architecture_map(model)
    scope = scope_from_params(model)
    gen = torch.Generator().manual_seed(2)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for mode in RANK_MODES:
        rows = rank_tensors(scores.items(), arch, k=3, mode=mode, by="abs")
        ranking = pl.DataFrame(
            [(r["group"], r["rank"], r["parameter"], r["flat_index"]) for r in rows],
            schema=["group_key", "rank", "parameter", "flat_index"],
            orient="row",
        )
        groups = group_scopes(arch, scope, mode)
        treatment_counts = {}
        for r in rows:
            treatment_counts[r["group"]] = treatment_counts.get(r["group"], 0) + 1
        is_treatment = spec.role == "treatment"
        request = SelectionRequest(
            name=name, param=None, k=len(rows), seed=1, key="abs", scope=scope, groups=groups,
            counts=None if is_treatment else treatment_counts, treatment=None, ranking=ranking,
            scores=lambda entries: ((e.name, scores[e.name]) for e in entries), model=model,
            arch=arch, store=None, rank_run=None, score_run=None,
        )  # fmt: skip
        selection = spec.build(request)
        params = dict(model.named_parameters())
        for pname, idx in selection.items():
            assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
            assert 0 <= int(idx.min()) and int(idx.max()) < params[pname].numel()
        counts = count_by_group(selection, arch, mode)
        if is_treatment or spec.matched:
            assert counts == treatment_counts, (mode, name)


@pytest.mark.parametrize("name", TASKS.names())
def test_task_contract(name: str, tiny_world) -> None:
    from cwa.evaluation.base import EvalTask
    from cwa.evaluation.tasks import plan_tasks
    from cwa.stages.tasks_check import check_task_files

    task = TASKS.get(name)
    assert issubclass(task, EvalTask) and task.name == name and task.metrics
    source = {"perplexity": tiny_world["text"]}.get(name, tiny_world.get(name))
    (plan,) = plan_tasks(f"{name}:{source}", limit=3)
    (again,) = plan_tasks(f"{name}:{source}", limit=3)
    assert plan.config_hash == again.config_hash and plan.task == name
    check_task_files([plan])  # a well-formed file passes the pre-registration check


PLUGINS = '''
import torch

def halve(originals, ctx):
    """multiply each selected weight by 0.5 (a plugin method)"""
    return (originals.float() * 0.5).to(originals.dtype)

def first_in_group(request):
    """per group, the treatment's count of weights, first in scope order (a plugin control)"""
    from cwa.perturbation.selection import Selection
    parts = {}
    for label, k in request.counts.items():
        left = k
        for entry in request.groups[label]:
            take = entry.flat_positions()[:left]
            if take.numel():
                parts[entry.name] = torch.unique(torch.cat([parts.get(entry.name, take), take]))
            left -= int(take.numel())
            if not left:
                break
    return Selection(parts, kind="first_in_group")

first_in_group.stochastic = False

def not_matched(request):
    """draws one weight only: not matched to the treatment"""
    from cwa.perturbation.selection import Selection
    entry = request.scope[0]
    return Selection({entry.name: entry.flat_positions()[:1]}, kind="not_matched")

not_a_function = 42
'''


def _score_rank(cli, world, mode: str = "layer") -> str:
    def ok(result):
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["runs"][0]["run_id"]

    score = ok(cli("--json", "score", "--model", str(world["model"]), "--data",
                   str(world["text"]), "--n-samples", "4", "--seq-len", "16"))  # fmt: skip
    return ok(cli("--json", "rank", score, "-k", "4", "--mode", mode))


def test_plugin_control_and_method_end_to_end(cli, tiny_world, store_path, tmp_path, monkeypatch):
    (tmp_path / "cwa_test_plugins.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with SELECTIONS.isolated(), PERTURBATION_METHODS.isolated():
        rank = _score_rank(cli, tiny_world)
        result = cli("--json", "perturb", rank, "--method", "cwa_test_plugins:halve",
                     "--controls", "random_k,cwa_test_plugins:first_in_group",
                     "--eval", f"perplexity:{tiny_world['text']}")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        run_id = json.loads(result.stdout)["runs"][0]["run_id"]
        conds = store_rows(store_path, "SELECT selection, method, k, n_changed FROM "
                           "perturbation_conditions WHERE run_id = ? ORDER BY selection",
                           [run_id])  # fmt: skip
        view = store_rows(store_path, "SELECT selection, group_key, treatment_k, selected_k FROM "
                          "condition_group_counts WHERE run_id = ?", [run_id])  # fmt: skip
        ranked = store_rows(store_path, "SELECT group_key, count(*) FROM ranked_weights "
                            "WHERE run_id = ? GROUP BY ALL", [rank])  # fmt: skip
        assert [c[0] for c in conds] == ["first_in_group", "random_k", "top_k"]
        assert {c[1] for c in conds} == {"halve"}
        n = sum(k for _, k in ranked)
        assert all(c[2] == n for c in conds)
        # halving changes every non-zero weight: the plugin method really ran
        assert all(0 < c[3] <= n for c in conds)
        first = {g: s for sel, g, t, s in view if sel == "first_in_group"}
        assert first == dict(ranked) and all(t == s for _, _, t, s in view)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--controls", "cwa_test_plugins:not_a_function"), "neither a SelectionSpec"),
        (("--method", "cwa_test_plugins:not_a_function"), "neither a PerturbationMethod"),
        (("--controls", "cwa_test_plugins:missing"), "has no attribute"),
        (("--controls", "no_such_module_xyz:f"), "cannot import plugin module"),
        (("--controls", "random_k:3"), "takes no parameter"),
        (("--controls", "top_k"), "is a treatment"),
        (("--treatment", "random_k"), "is a control"),
    ],
)
def test_bad_plugins_are_refused_before_a_run(
    cli, tiny_world, store_path, tmp_path, monkeypatch, args, message
):
    (tmp_path / "cwa_test_plugins.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with SELECTIONS.isolated(), PERTURBATION_METHODS.isolated():
        rank = _score_rank(cli, tiny_world, mode="global")
        from cwa.store import Store
        from cwa.store.results import run_ids

        before = run_ids(Store(store_path))
        result = cli("perturb", rank, *args, "--eval", f"perplexity:{tiny_world['text']}")
        assert result.exit_code != 0 and message in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
        assert run_ids(Store(store_path)) == before


def test_unmatched_plugin_control_fails_the_run_with_the_reason(
    cli, tiny_world, store_path, tmp_path, monkeypatch
):
    (tmp_path / "cwa_test_plugins.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with SELECTIONS.isolated():
        rank = _score_rank(cli, tiny_world)
        result = cli("perturb", rank, "--controls", "cwa_test_plugins:not_matched",
                     "--eval", f"perplexity:{tiny_world['text']}")  # fmt: skip
        assert result.exit_code == 1 and "not matched to the treatment" in result.stderr


def test_unknown_selection_suggests() -> None:
    from cwa.perturbation.contract import parse_selection

    with pytest.raises(UnknownName, match="did you mean 'random_k'"):
        parse_selection("randomk")
    assert math.isfinite(1.0)


def test_entry_point_plugins_end_to_end(cli, tiny_world, store_path, tmp_path, monkeypatch):
    """Plugins installed as entry points (groups cwa.selections, cwa.perturbations) are used by
    name through the CLI like built-ins."""
    (tmp_path / "cwa_test_plugins.py").write_text(PLUGINS)
    dist = tmp_path / "cwa_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cwa-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cwa.selections]\nfirst_in_group = cwa_test_plugins:first_in_group\n\n"
        "[cwa.perturbations]\nhalve = cwa_test_plugins:halve\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with SELECTIONS.isolated(), PERTURBATION_METHODS.isolated():
        for registry in (SELECTIONS, PERTURBATION_METHODS):
            monkeypatch.setattr(registry, "_entry_points_loaded", False)
        rank = _score_rank(cli, tiny_world)
        result = cli("--json", "perturb", rank, "--method", "halve", "--controls", "first_in_group",
                     "--eval", f"perplexity:{tiny_world['text']}")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        run_id = json.loads(result.stdout)["runs"][0]["run_id"]
        rows = store_rows(
            store_path,
            "SELECT selection, method, treatment_k = selected_k FROM condition_group_counts "
            "JOIN perturbation_conditions USING (run_id, condition_id, selection, method) "
            "WHERE run_id = ?",
            [run_id],
        )
        assert {(s, m) for s, m, _ in rows} == {("top_k", "halve"), ("first_in_group", "halve")}
        assert all(ok for *_, ok in rows)
