"""A small store of known results (no model): score, rank, evaluate, perturb and analyze runs
written through the normal run lifecycle, for the report tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.store import Store

PPL_BASELINE = 3.0
TOP_PPL = {10: 12.0, 100: 330.0}
RANDOM_PPL = {10: [3.0, 3.03, 3.06], 100: [3.03, 3.09, 3.12]}
BOTTOM_PPL = {10: 3.0, 100: 3.0}
ACC_BASELINE = 0.9
TOP_ACC = {10: 0.8, 100: 0.3}
RANDOM_ACC = {10: [0.9, 0.9, 0.88], 100: [0.9, 0.88, 0.86]}
COMPONENTS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down")


@dataclass
class ReportWorld:
    score: str
    rank: str
    evaluate: str
    perturb: str
    analyze: str | None = None
    seeds: list[str] = field(default_factory=list)
    tensor_stats: list[dict] = field(default_factory=list)


def _tensor_stats(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [
        dict(parameter="embed.weight", layer=None, component="embed", numel=4000,
             mean=1e-4, std=1e-4, min=0.0, max=0.02, p50=5e-5, p90=2e-4, p99=1e-3,
             p99_9=5e-3, sum=0.4, top1pct_mass_share=0.2, zeros=0, nonfinite=0)
    ]
    for layer in range(3):
        for component in COMPONENTS:
            numel = 1024 if component.startswith("attn") else 4096
            mean = float(10 ** (-4 + 0.3 * layer) * rng.uniform(0.8, 1.2))
            rows.append(
                dict(parameter=f"h.{layer}.{component}.weight", layer=layer, component=component,
                     numel=numel, mean=mean, std=mean, min=0.0, max=mean * 50,
                     p50=mean * 0.6, p90=mean * 2, p99=mean * 6, p99_9=mean * 15,
                     sum=mean * numel, top1pct_mass_share=0.1, zeros=0, nonfinite=0)
            )
    return rows


def _ranked(k: int) -> list[dict]:
    rows = []
    for r in range(k):
        component = ("attn_q", "attn_k", "mlp_down", "embed")[r % 4]
        layer = None if component == "embed" else r % 3
        head = {"attn_q": (r // 4) % 4, "attn_k": (r // 4) % 2}.get(component)  # GQA: 4 q, 2 kv
        rows.append(dict(group_key="all", rank=r + 1, parameter=f"p{component}", flat_index=r,
                         row_index=r, column_index=0, layer=layer, component=component,
                         head=head, score=1.0 / (r + 1), weight_value=0.1))
    return rows


def _eval_row(condition, task, metric, value):
    return dict(condition_id=condition, task=task, metric=metric, value=value, stderr=None,
                n=100, task_config_hash=f"h-{task}", model_fingerprint="fp-model")


def _perturb_tables() -> dict[str, list[dict]]:
    conditions, evals = [], [
        _eval_row(None, "perplexity", "perplexity", PPL_BASELINE),
        _eval_row(None, "hellaswag", "acc", ACC_BASELINE),
    ]

    def add(selection, k, seed, ppl, acc):
        cid = f"{selection}|sign_flip|k={k}" + ("" if seed is None else f"|seed={seed}")
        conditions.append(dict(condition_id=cid, selection=selection, method="sign_flip",
                               scale=None, bit=None, k=k, seed=seed, n_changed=k, scope=None,
                               checksum_before="x", checksum_after="x", restored=True))
        evals.append(_eval_row(cid, "perplexity", "perplexity", ppl))
        evals.append(_eval_row(cid, "hellaswag", "acc", acc))

    for k in (10, 100):
        add("top_k", k, None, TOP_PPL[k], TOP_ACC[k])
        add("bottom_k", k, None, BOTTOM_PPL[k], ACC_BASELINE)
        for seed, (ppl, acc) in enumerate(zip(RANDOM_PPL[k], RANDOM_ACC[k], strict=True)):
            add("random_k", k, seed, ppl, acc)
    return {"perturbation_conditions": conditions, "evaluations": evals}


# Items per task whose prediction each condition changes (top_k flips many, controls few).
FLIPS = {"top_k": 6, "bottom_k": 0, "random_k": [1, 0, 2]}
N_ITEMS = 10


def _items(condition, prediction_flipped: int, k: int | None = None) -> list[dict]:
    return [
        dict(condition_id=condition, task="hellaswag", item_index=i, gold=0,
             prediction=1 if i < prediction_flipped else 0,
             acc=0.0 if i < prediction_flipped else 1.0, acc_norm=None, choice_loglik=None,
             target_loglik=None, greedy=None, task_config_hash="h-hellaswag")
        for i in range(N_ITEMS)
    ]


def _item_rows() -> list[dict]:
    rows = _items(None, 0)
    for k in (10, 100):
        rows += _items(f"top_k|sign_flip|k={k}", FLIPS["top_k"])
        rows += _items(f"bottom_k|sign_flip|k={k}", FLIPS["bottom_k"])
        for seed, n in enumerate(FLIPS["random_k"]):
            rows += _items(f"random_k|sign_flip|k={k}|seed={seed}", n)
    return rows


ACTIVATIONS = {0: (5.0, 3.0), 1: (900.0, 450.0), 2: (7.0, 4.0)}  # layer -> (max in, max out)


def _activation_rows() -> list[dict]:
    rows = []
    for layer, (inp, out) in ACTIVATIONS.items():
        for rnd, factor in ((1, 1.0), (2, 0.01)):  # round 2: after removing the super weight
            rows.append(dict(layer=layer, parameter=f"h.{layer}.mlp_down.weight",
                             max_input_abs=inp * factor, input_channel=3,
                             input_spike_ratio=10.0, max_output_abs=out * factor,
                             output_channel=5, output_spike_ratio=9.0, round=rnd))
    return rows


def _model(ctx) -> None:
    ctx.set_model("toy-fake", "fp-model", "cpu")


def build_report_world(store: Store, *, analyze: bool = True, experiment: str = "study",
                       items: bool = False) -> ReportWorld:
    def stage(name, config, tables=None, parents=(), seed=None):
        def compute(ctx):
            _model(ctx)
            return StageOutput(tables=tables or {})

        return execute_stage(
            store,
            StageRequest(name, config, experiment=experiment, parents=list(parents),
                         model_ref="toy-fake", seed=seed, command=f"cwa {name}"),
            compute,
            mlflow=False,
        ).run_id

    seeds = []
    stats0 = _tensor_stats(0)
    for seed in range(3):
        stats = stats0 if seed == 0 else _tensor_stats(seed)
        tables = {"tensor_stats": stats}
        if items and seed == 0:
            tables["activation_profile"] = _activation_rows()
        seeds.append(stage("score", {"metric": "grad_x_weight", "data": {"source": "toy"}},
                           tables, seed=seed))
    score = seeds[0]
    rank = stage("rank", {"topk": 100, "score_run": score}, {"ranked_weights": _ranked(100)},
                 parents=[(score, "scores")])
    evaluate = stage("evaluate", {"tasks": "perplexity,hellaswag"},
                     {"evaluations": _perturb_tables()["evaluations"][:2]})
    perturb_tables = _perturb_tables()
    if items:
        perturb_tables["evaluation_items"] = _item_rows()
    perturb = stage("perturb", {"method": "sign_flip"}, perturb_tables,
                    parents=[(rank, "ranking"), (evaluate, "baseline")])
    world = ReportWorld(score, rank, evaluate, perturb, seeds=seeds, tensor_stats=stats0)
    if analyze:
        world.analyze = stage("analyze", {"analyzers": ["stability"]},
                              _analysis_tables(seeds), parents=[(s, "input") for s in seeds])
    return world


STABILITY = {  # k -> (jaccard mean, ci_low, ci_high)
    10: (0.5, 0.4, 0.6),
    100: (0.7, 0.65, 0.75),
    1000: (0.8, 0.78, 0.82),
}


def _analysis_tables(seeds: list[str]) -> dict[str, list[dict]]:
    summary = [
        dict(scope="global", group_key="all", k=k, k_label=str(k), statistic="jaccard",
             n_runs=3, n_pairs=3, mean=m, std=0.05, min=lo, max=hi, ci_low=lo, ci_high=hi,
             ci_level=0.95, ci_method="bootstrap_runs")
        for k, (m, lo, hi) in STABILITY.items()
    ]
    corr = []
    for i, a in enumerate(seeds):
        for j, b in enumerate(seeds):
            corr.append(dict(kind="metric", scope="global", group_key="all", row_key=a,
                             col_key=b, statistic="spearman",
                             value=1.0 if i == j else 0.9 - 0.1 * abs(i - j), n=1000))
    clusters = [
        dict(score_run_id=seeds[0], algorithm="kmeans", cluster_id=c, size=size, n_top=size // 2,
             silhouette=0.5, mean_score=1e-3, mean_abs_weight=0.1, mean_depth=0.5,
             top_component="mlp_down", top_layer=1, is_noise=False)
        for c, size in CLUSTER_SIZES.items()
    ]
    centroids = [
        dict(cluster_id=c, feature=f, value=v, value_scaled=v)
        for c, vec in CLUSTER_CENTRES.items()
        for f, v in zip(("log_score_0", "depth", "abs_weight"), vec, strict=True)
    ]
    effects = [
        dict(perturb_run_id="x", method="sign_flip", scale=None, bit=None, k=100,
             task="perplexity", metric="perplexity", task_config_hash="h-perplexity",
             treatment="top_k", control="random_k", n_treatment=1, n_control=3, baseline=3.0,
             treatment_mean=330.0, treatment_sd=None, control_mean=3.08, control_sd=0.05,
             difference=EFFECT[0], ratio=None, ci_low=EFFECT[1], ci_high=EFFECT[2],
             ci_level=0.95, z=EFFECT[3], frac_controls_worse=0.0, treatment_damage=327.0,
             control_damage=0.08, damage_per_weight=3.27, control_damage_per_weight=0.0008)
    ]
    return {"analysis_stability_summary": summary, "analysis_correlation": corr,
            "analysis_clusters": clusters, "analysis_cluster_centroids": centroids,
            "analysis_effects": effects}


EFFECT = (326.92, 326.8, 327.05, 6538.4)  # difference, ci_low, ci_high, z


CLUSTER_SIZES = {0: 120, 1: 40, 2: 300}
CLUSTER_CENTRES = {0: (1.0, 0.0, 0.5), 1: (-1.0, 2.0, 0.0), 2: (0.0, -1.0, -0.5)}
