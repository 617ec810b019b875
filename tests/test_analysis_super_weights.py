"""The super_weights analyzer on a toy model with a planted super weight, checked against
ablations done by hand on freshly loaded copies of the model, and its bad inputs.

The plant (GPT-2 layout, pre-LayerNorm): MLP hidden unit j of layer 0 is made a constant A on
every token (its input weights zeroed, its bias A) and its row of the down projection c_proj set
to a constant c, so every residual dimension gets the same massive offset A*c. Every later
LayerNorm subtracts the mean over dimensions, so the offset cancels exactly and the model
computes what it computed before (minus unit j). Zeroing ONE weight W[j, i] of that row leaves
dimension i A*c below all the others: a massive activation no LayerNorm removes, and the model
breaks — a super weight by construction, which the super_weight metric must also find (input
spike at channel j, output spike A*c).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _analysis_world import run_count

from cwa.store import Store

A, C = 100.0, 10.0


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def planted(toy_model_path, tmp_path_factory) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("planted") / "model"
    model = AutoModelForCausalLM.from_pretrained(toy_model_path).eval()
    mlp = model.transformer.h[0].mlp
    unit = int(mlp.c_proj.weight.detach().norm(dim=1).argmin())  # the least used hidden unit
    with torch.no_grad():
        mlp.c_fc.weight[:, unit] = 0.0
        mlp.c_fc.bias[unit] = A
        mlp.c_proj.weight[unit, :] = C
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(toy_model_path).save_pretrained(folder)
    data = Path(toy_model_path).parent / "data-v1" / "calibration.txt"
    assert data.is_file()
    return {"model": folder, "unit": unit, "data": data}


def _score(cli, planted, metric: str = "super_weight", *options: str) -> str:
    """A score run of the planted model. For super_weight, by default a spike threshold of 1
    (every down projection yields its round-1 candidate: the planted weight in layer 0, an
    ordinary weight in layer 1, the negative example)."""
    if metric == "super_weight" and not options:
        options = ("spike_threshold=1", "rounds=1")
    extra = [part for option in options for part in ("--metric-option", option)]
    out = _ok(
        cli("--json", "score", "--model", str(planted["model"]), "--metric", metric,
            "--data", str(planted["data"]), "--n-samples", "8", "--seq-len", "64", *extra)
    )  # fmt: skip
    return out["runs"][0]["run_id"]


def _perplexity(folder: Path, plans, zero: tuple[str, int] | None) -> float:
    """Perplexity of a freshly loaded model, optionally with one weight set to 0 by hand."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwa.evaluation.runner import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if zero is not None:
        with torch.no_grad():
            dict(model.named_parameters())[zero[0]].view(-1)[zero[1]] = 0.0
    rows = evaluate_model(model, AutoTokenizer.from_pretrained(folder), plans)
    return next(r["value"] for r in rows if r["metric"] == "perplexity")


@pytest.mark.slow
def test_planted_super_weight_is_found_and_verified(cli, planted, store_path, one_thread) -> None:
    score_id = _score(cli, planted)
    out = _ok(
        cli("--json", "analyze", "super_weights", score_id, "--verify",
            "-o", "seeds=3", "-o", "limit=12")
    )  # fmt: skip
    analysis_id = out["runs"][0]["run_id"]
    with Store(store_path).read() as con:
        rows = con.execute(
            "SELECT layer, parameter, row_index, column_index, flat_index, weight_value, "
            "baseline, zeroed, ratio, control_mean, control_sd, z_score, is_super_weight "
            "FROM analysis_super_weights WHERE run_id = ? ORDER BY layer",
            [analysis_id],
        ).fetchall()
        controls = con.execute(
            "SELECT parameter, candidate_index, flat_index, zeroed FROM "
            "analysis_super_weight_controls WHERE run_id = ? ORDER BY parameter, seed",
            [analysis_id],
        ).fetchall()
        view = con.execute(
            "SELECT layer, is_super_weight FROM verified_super_weights ORDER BY layer"
        ).fetchall()
    planted_row, natural_row = rows
    layer, name, row, column, flat, value, baseline, zeroed, ratio, *_, real = planted_row
    # The metric found the planted weight: row = the constant unit, weight = C.
    assert (layer, row, value) == (0, planted["unit"], C)
    assert flat == row * 128 + column
    assert real is True and natural_row[-1] is False
    assert view == [(0, True), (1, False)]
    # Independent ablations by hand on fresh copies of the model give the stored numbers, on
    # the held-out tail of the calibration text (never the part calibration used).
    from cwa.evaluation.tasks import plan_tasks
    from cwa.stages.common import calibration_records

    folder = planted["model"]
    data = plan_tasks(
        f"perplexity:{planted['data']}", limit=12, seed=0,
        calibration=calibration_records(Store(store_path), [score_id]),
    )  # fmt: skip
    assert "held-out part only" in data[0].options["note"]
    with Store(store_path).read() as con:
        (config,) = con.execute(
            "SELECT config FROM runs WHERE run_id = ?", [analysis_id]
        ).fetchone()
    recorded = json.loads(config)["effective"]["perplexity"]
    assert recorded["task_config_hash"] == data[0].config_hash
    assert "held-out part only" in recorded["scored"]
    assert baseline == pytest.approx(_perplexity(folder, data, None), rel=1e-6)
    assert zeroed == pytest.approx(_perplexity(folder, data, (name, flat)), rel=1e-6)
    assert ratio == pytest.approx(zeroed / baseline, rel=1e-12) and ratio > 100
    mine = [c for c in controls if c[0] == name]
    assert len(mine) == 3 and all(c[1] == flat and c[2] != flat for c in mine)
    assert mine[0][3] == pytest.approx(_perplexity(folder, data, (name, mine[0][2])), rel=1e-6)
    values = np.array([c[3] for c in mine])
    assert planted_row[9] == pytest.approx(values.mean())
    assert planted_row[10] == pytest.approx(values.std(ddof=1))
    assert planted_row[11] == pytest.approx((zeroed - values.mean()) / values.std(ddof=1))
    # Removing the natural layer-1 candidate does nothing beyond what random weights do.
    assert natural_row[8] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_profile_without_verify_and_bad_inputs(cli, planted, store_path, one_thread) -> None:
    score_id = _score(cli, planted)
    out = _ok(cli("--json", "analyze", "super-weights", score_id))  # the spelling
    analysis_id = out["runs"][0]["run_id"]
    with Store(store_path).read() as con:
        cands = con.execute(
            "SELECT layer, input_activation, output_activation FROM super_weights "
            "WHERE run_id = ? ORDER BY layer",
            [score_id],
        ).fetchall()
        profile = con.execute(
            "SELECT layer, max_input_abs, max_output_abs, layer_input_ratio, "
            "layer_output_ratio, source FROM analysis_super_weight_profile WHERE run_id = ? "
            "ORDER BY layer",
            [analysis_id],
        ).fetchall()
        verified = con.execute(
            "SELECT bool_or(verified) FROM analysis_super_weights WHERE run_id = ?",
            [analysis_id],
        ).fetchone()[0]
        recorded = con.execute(
            "SELECT layer, max_input_abs, max_output_abs FROM activation_profile "
            "WHERE run_id = ? AND round = 1 ORDER BY layer",
            [score_id],
        ).fetchall()
    assert verified is False
    expected_source = "activation_profile" if recorded else "candidates"
    cands = recorded or cands  # the profile comes from activation_profile when it was recorded
    inputs = np.array([c[1] for c in cands])
    outputs = np.array([c[2] for c in cands])
    for (layer, max_in, max_out, in_ratio, out_ratio, source), cand in zip(
        profile, cands, strict=True
    ):
        assert layer == cand[0] and max_in == cand[1] and max_out == cand[2]
        assert source == expected_source
        assert in_ratio == pytest.approx(max_in / np.median(inputs))
        assert out_ratio == pytest.approx(max_out / np.median(outputs))
    assert profile[0][2] > 1000 * 0.9 and profile[0][1] == pytest.approx(A)  # the planted spike
    store = Store(store_path)
    # At the default spike threshold the planted offset (the same on every output channel) is
    # no output spike: no candidate, but the profile is still shown; --verify has nothing to do.
    quiet = _score(cli, planted, "super_weight", "spike_threshold=50", "rounds=1")
    only_profile = _ok(cli("--json", "analyze", "super_weights", quiet))["runs"][0]["run_id"]
    with store.read() as con:
        counts = con.execute(
            "SELECT (SELECT count(*) FROM analysis_super_weights WHERE run_id = $1), "
            "(SELECT count(*) FROM analysis_super_weight_profile WHERE run_id = $1)",
            [only_profile],
        ).fetchone()
    assert counts == (0, 2)
    before = run_count(store)
    other = _score(cli, planted, metric="magnitude")
    before += 1
    rank = _ok(cli("--json", "rank", score_id, "--topk", "5"))["runs"][0]["run_id"]
    before += 1
    bad = [
        (("analyze", "super_weights", rank), "takes score runs"),
        (("analyze", "super_weights", other), "needs a run of `cwa score --metric super_weight`"),
        (("analyze", "super_weights", score_id, "-o", "seeds=1"), "must be at least 2"),
        (("analyze", "super_weights", score_id, "-o", "sedes=3"), "did you mean"),
        (
            ("analyze", "super_weights", score_id, "-o", "verify=true", "-o", "data=/no/file.txt"),
            "does not exist",
        ),
        (("analyze", "super_weights", score_id, other), "at most 1"),
        (("analyze", "super_weights", quiet, "-o", "verify=true"), "no super-weight candidate"),
    ]
    for args, text in bad:
        result = cli(*args)
        assert result.exit_code != 0, args
        assert text in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert run_count(store) == before, args


def test_profile_rows_from_activation_profile() -> None:
    import polars as pl

    from cwa.analysis.superweight_verify import profile_rows, verdict

    profile = pl.DataFrame(
        {"layer": [0, 1, 2, 0], "parameter": ["a", "b", "c", "a"], "round": [1, 1, 1, 2],
         "max_input_abs": [2.0, 50.0, 4.0, 3.0], "input_channel": [1, 2, 3, 1],
         "input_spike_ratio": [1.5, 30.0, 2.0, 1.1], "max_output_abs": [1.0, 9.0, 3.0, 2.0],
         "output_channel": [0, 5, 6, 0], "output_spike_ratio": [1.0, 20.0, 1.2, 1.0]}
    )  # fmt: skip
    rows = profile_rows(profile, None)
    first = rows.filter(pl.col("round") == 1).sort("layer")
    assert first["source"].unique().to_list() == ["activation_profile"]
    assert first["layer_input_ratio"].to_list() == pytest.approx([2 / 4, 50 / 4, 4 / 4])
    assert first["layer_output_ratio"].to_list() == pytest.approx([1 / 3, 9 / 3, 3 / 3])
    assert rows.filter(pl.col("round") == 2)["layer_input_ratio"].to_list() == [1.0]
    # The verdict rule on hand-made numbers.
    yes = verdict(10.0, 40.0, [10.1, 10.0, 9.9], min_ratio=1.5, min_z=3.0)
    assert yes["is_super_weight"] and yes["ratio"] == 4.0
    assert yes["z_score"] == pytest.approx((40.0 - 10.0) / 0.1)
    assert not verdict(10.0, 12.0, [10.1, 10.0, 9.9], 1.5, 3.0)["is_super_weight"]  # small
    assert not verdict(10.0, 40.0, [10.0, 41.0, 9.0], 1.5, 3.0)["is_super_weight"]  # a control
    flat = verdict(10.0, 10.5, [10.0, 10.0], 1.01, 3.0)
    assert flat["z_score"] is None and flat["is_super_weight"]  # zero spread: above the mean
    assert verdict(10.0, math.inf, [10.0, 10.2], 1.5, 3.0)["is_super_weight"]
