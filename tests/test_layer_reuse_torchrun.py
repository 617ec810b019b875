"""Layer reuse under torchrun: each rank captures and replays the batches it owns, and the
perturb run's evaluation rows equal a single-process ``--no-layer-reuse`` run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _store_access import store_rows
from _torchrun_driver import launch

OPTIONS = ["--method", "scale", "--scale", "-2", "--controls", "random_k", "--seeds", "0,1",
           "--layers", "1", "--eval", "perplexity,hellaswag,lambada", "--limit", "7",
           "--batch-size", "3"]  # fmt: skip


@pytest.mark.slow
def test_torchrun_perturb_with_layer_reuse_equals_one_process(
    tmp_path: Path, cli, toy_env, one_thread
) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    # Score and rank once in this process; both perturb runs start from that store.
    for argv in (["score", "--model", "toy", "--n-samples", "4", "--seq-len", "16"],
                 ["rank", "latest", "-k", "3000"]):  # fmt: skip
        result = cli("--store", str(single), *argv)
        assert result.exit_code == 0, result.output
    rank_id = store_rows(single, "SELECT run_id FROM runs WHERE stage = 'rank'")[0][0]
    shutil.copytree(single, multi)
    result = cli("--store", str(single), "perturb", rank_id, *OPTIONS, "--no-layer-reuse")
    assert result.exit_code == 0, result.output

    launch(tmp_path, [["--store", str(multi), "perturb", rank_id, *OPTIONS]])

    configs = store_rows(multi, "SELECT config FROM runs WHERE stage = 'perturb'")
    (config,) = [json.loads(c) for (c,) in configs]
    reuse = config["layer_reuse"]
    assert config["world_size"] == 2 and reuse["from_layer"] == 1
    assert (reuse["conditions_captured"], reuse["conditions_replayed"]) == (1, 2)
    assert reuse["fallback_calls"] == 0 and reuse["replayed_calls"] > 0
    rows = (
        "SELECT e.condition_id, e.task, e.metric, e.value, e.n FROM evaluations e "
        "JOIN runs r USING (run_id) WHERE r.stage = 'perturb' ORDER BY ALL"
    )
    expected = store_rows(single, rows)
    assert len(expected) == 4 * 7 and store_rows(multi, rows) == expected
