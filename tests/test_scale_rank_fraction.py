"""``cwa rank --topk N%``: exact selection artifact + first rows in ranked_weights; bad input
registers nothing."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest


def _runs(store_path) -> list[tuple]:
    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    try:
        return con.execute("SELECT run_id, stage, status FROM runs ORDER BY run_id").fetchall()
    finally:
        con.close()


def test_rank_fraction_end_to_end(cli, store_path, toy_env, one_thread) -> None:
    from cwa.ranking_store import iter_selection
    from cwa.scorefile import open_scores

    result = cli("score", "--model", "toy", "--metric", "magnitude")
    assert result.exit_code == 0, result.output
    result = cli("rank", "latest:score", "--topk", "30%")
    assert result.exit_code == 0, result.output
    (score_id, _, _), (rank_id, stage, status) = _runs(store_path)
    assert (stage, status) == ("rank", "succeeded")
    artifacts = store_path / "artifacts"

    with open_scores(artifacts / score_id / "scores.safetensors") as reader:
        names = reader.names()
        flat = [reader.get(n).numpy().reshape(-1).astype(np.float64) for n in names]
    keys = np.concatenate(flat)
    valid = ~np.isnan(keys)
    n = int(valid.sum())
    k = round(0.3 * n)
    order = np.lexsort((np.concatenate([np.arange(f.size) for f in flat]),
                        np.concatenate([np.full(f.size, i) for i, f in enumerate(flat)]),
                        -np.where(valid, keys, -np.inf)))[:k]  # fmt: skip
    offsets = np.cumsum([0] + [f.size for f in flat])
    expected = {int(j) for j in order}
    got = set()
    for name, idx in iter_selection(artifacts / rank_id / "selection.bin"):
        got.update(int(offsets[names.index(name)] + i) for i in idx)
    assert got == expected

    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT parameter, flat_index, rank FROM ranked_weights WHERE run_id = ? ORDER BY rank",
        [rank_id],
    ).fetchall()
    config = con.execute("SELECT config FROM runs WHERE run_id = ?", [rank_id]).fetchone()[0]
    metric = con.execute(
        "SELECT value FROM run_metrics WHERE run_id = ? AND name = 'n_selected'", [rank_id]
    ).fetchone()[0]
    con.close()
    from cwa.ranking_store import ROWS_IN_TABLE

    assert len(rows) == min(k, ROWS_IN_TABLE) and metric == k
    # The table's rows are the best of the selection, in order.
    table = [int(offsets[names.index(p)] + i) for p, i, _ in rows]
    assert table == [int(j) for j in order[: len(rows)]]
    import json

    assert json.loads(config)["selection"]["k"] == k


@pytest.mark.parametrize(
    "args",
    [["--topk", "50%", "--mode", "layer"], ["--topk", "0%"], ["--topk", "abc%"],
     ["--topk", "50%", "--components", "attn_q"]],
)  # fmt: skip
def test_bad_fraction_registers_nothing(cli, store_path, toy_env, one_thread, args) -> None:
    result = cli("score", "--model", "toy", "--metric", "magnitude")
    assert result.exit_code == 0, result.output
    before = _runs(store_path)
    result = cli("rank", "latest:score", *args)
    assert result.exit_code != 0
    assert "Error:" in result.output and "topk" in result.output
    assert _runs(store_path) == before
