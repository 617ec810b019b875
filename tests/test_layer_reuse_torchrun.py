"""Layer reuse under torchrun: each rank captures and replays the batches it owns, and the
perturb run's evaluation rows equal a single-process ``--no-layer-reuse`` run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _torchrun_driver import DRIVER

OPTIONS = ["--method", "scale", "--scale", "-2", "--controls", "random_k", "--seeds", "0,1",
           "--layers", "1", "--eval", "perplexity,hellaswag,lambada", "--limit", "7",
           "--batch-size", "3"]  # fmt: skip


def _table(store: Path, sql: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(store / "cwa.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_torchrun_perturb_with_layer_reuse_equals_one_process(
    tmp_path: Path, cli, toy_env, one_thread
) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed next to this Python")
    single, multi = tmp_path / "single", tmp_path / "multi"
    # Score and rank once in this process; both perturb runs start from that store.
    for argv in (["score", "--model", "toy", "--n-samples", "4", "--seq-len", "16"],
                 ["rank", "latest", "-k", "3000"]):  # fmt: skip
        result = cli("--store", str(single), *argv)
        assert result.exit_code == 0, result.output
    rank_id = _table(single, "SELECT run_id FROM runs WHERE stage = 'rank'")[0][0]
    shutil.copytree(single, multi)
    result = cli("--store", str(single), "perturb", rank_id, *OPTIONS, "--no-layer-reuse")
    assert result.exit_code == 0, result.output

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # The checkout first on the workers' path (an editable install may point elsewhere).
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CWA_MLFLOW": "0", "PYTHONPATH": path}
    command = [["--store", str(multi), "perturb", rank_id, *OPTIONS]]
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(driver), json.dumps(command)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    configs = _table(multi, "SELECT config FROM runs WHERE stage = 'perturb'")
    (config,) = [json.loads(c) for (c,) in configs]
    reuse = config["layer_reuse"]
    assert config["world_size"] == 2 and reuse["from_layer"] == 1
    assert (reuse["conditions_captured"], reuse["conditions_replayed"]) == (1, 2)
    assert reuse["fallback_calls"] == 0 and reuse["replayed_calls"] > 0
    rows = (
        "SELECT e.condition_id, e.task, e.metric, e.value, e.n FROM evaluations e "
        "JOIN runs r USING (run_id) WHERE r.stage = 'perturb' ORDER BY ALL"
    )
    expected = _table(single, rows)
    assert len(expected) == 4 * 7 and _table(multi, rows) == expected
