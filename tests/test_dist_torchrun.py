"""torchrun data parallelism: 2 gloo processes on CPU give the single-process results.

One torchrun launch (``--standalone --nproc-per-node 2``, one thread per process) runs a small
driver that invokes the real CLI several times in the same process group: ``score`` with four
metrics whose accumulators are all-reduced in different ways (gradient sum, per-example Fisher
sum, Hutchinson z*Hz with shared probes, Wanda squared activation norms, super-weight spike
maxima by MAX) and ``evaluate`` on
perplexity, HellaSwag and LAMBADA. The same commands run in one process (in-process CLI) into
another store; score files must agree within float32 tolerance (summation order differs),
evaluation rows and per-item records must be equal, only rank 0 may have written (one run per
command, the run records world_size 2, one answer on stdout).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _store_access import store_rows
from _torchrun_driver import launch

SCORE_ARGS = ["--model", "toy", "--n-samples", "10", "--seq-len", "24", "--batch-size", "3"]
METRICS = [
    ["--metric", "grad_x_weight"],
    ["--metric", "grad_squared"],
    ["--metric", "hutchinson_diag", "--probes", "2", "--layers", "1"],
    ["--metric", "wanda"],
    ["--metric", "super_weight", "--metric-option", "spike_threshold=2"],
]
EVAL_ARGS = [
    "evaluate", "--model", "toy", "--tasks", "perplexity,hellaswag,lambada",
    "--limit", "11", "--batch-size", "3",
]  # fmt: skip



def _commands(store: Path) -> list[list[str]]:
    commands = [["--store", str(store), "score", *SCORE_ARGS, *m] for m in METRICS]
    commands.append(["--store", str(store), *EVAL_ARGS])
    return commands


def _scores(store: Path) -> dict[str, dict[str, object]]:
    """metric -> {tensor name -> tensor} of every score run in the store."""
    from safetensors import safe_open

    runs = store_rows(
        store,
        "SELECT run_id, json_extract_string(config, '$.metric') FROM runs "
        "WHERE stage = 'score' ORDER BY run_id",
    )
    out: dict[str, dict[str, object]] = {}
    for run_id, metric in runs:
        path = store / "artifacts" / run_id / "scores.safetensors"
        with safe_open(str(path), "pt") as f:
            out[metric] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path: Path, cli, one_thread) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    for argv in _commands(single):
        result = cli(*argv)
        assert result.exit_code == 0, result.output

    proc = launch(tmp_path, _commands(multi))

    # Rank 0 alone wrote: one run per command, each recording the world size.
    runs = store_rows(multi, "SELECT stage, json_extract(config, '$.world_size') FROM runs")
    assert sorted(r[0] for r in runs) == ["evaluate", *["score"] * len(METRICS)]
    assert all(int(r[1]) == 2 for r in runs)
    assert all(
        r[0] is None
        for r in store_rows(single, "SELECT json_extract(config, '$.world_size') FROM runs")
    )
    supers = "SELECT layer, row_index, column_index, input_activation FROM super_weights"
    supers += " ORDER BY ALL"
    assert store_rows(single, supers) and store_rows(multi, supers) == store_rows(single, supers)
    # stdout carries each answer once (rank 1's stdout is silenced): every run id once.
    run_ids = {r[0] for r in store_rows(multi, "SELECT run_id FROM runs")}
    printed = [word for word in proc.stdout.split() if word in run_ids]
    assert sorted(printed) == sorted(run_ids)

    import torch

    ref, got = _scores(single), _scores(multi)
    assert set(ref) == set(got) == {m[1] for m in METRICS}
    for metric, tensors in ref.items():
        assert set(tensors) == set(got[metric])
        for name, expected in tensors.items():
            actual = got[metric][name]
            scale = float(expected.nan_to_num().abs().max()) or 1.0
            torch.testing.assert_close(
                actual, expected, rtol=1e-4, atol=1e-5 * scale, equal_nan=True,
                msg=lambda m, metric=metric, name=name: f"{metric} {name}: {m}",
            )  # fmt: skip
        assert any(float(t.nan_to_num().abs().max()) > 0 for t in tensors.values())
    losses = (
        "SELECT name, value FROM run_metrics WHERE name LIKE 'calibration%' ORDER BY run_id, name"
    )
    pairs = zip(store_rows(single, losses), store_rows(multi, losses), strict=True)
    for (n1, v1), (n2, v2) in pairs:
        assert n1 == n2 and v2 == pytest.approx(v1, rel=1e-6)

    rows = "SELECT task, metric, value, stderr, n FROM evaluations ORDER BY task, metric"
    assert store_rows(multi, rows) == store_rows(single, rows)
    items = (
        "SELECT task, item_index, prediction, acc, acc_norm, choice_loglik, target_loglik, greedy"
        " FROM evaluation_items ORDER BY task, item_index"
    )
    single_items = store_rows(single, items)
    assert len(single_items) == 22 and store_rows(multi, items) == single_items
