"""Single-process checks of the torchrun helpers (the 2-process run is tests/test_dist_torchrun.py):
round-robin shards carry the whole set's counts, one process is the identity, and metrics
without reduced accumulators are refused under torchrun before any run is registered."""

from __future__ import annotations

import pytest
import torch

from cwa import distributed
from cwa.errors import InvalidInput


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for rows in (2, 3, 1, 2, 4):
        ids = torch.randint(0, 50, (rows, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def fake_world(monkeypatch: pytest.MonkeyPatch):
    def set_world(rank: int, size: int) -> None:
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank, size, rank, "gloo"))

    yield set_world
    distributed.reset_for_tests()


def test_shards_are_round_robin_with_global_counts(fake_world) -> None:
    from cwa.metrics.base import count_targets

    batches = _batches()
    # By hand: targets per row = real tokens - 1; row 0 of every batch has 5 real tokens.
    tokens = sum(int(b["attention_mask"].sum()) - b["input_ids"].shape[0] for b in batches)
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    assert count_targets(batches) == (tokens, sequences)
    seen = []
    for rank in range(3):
        fake_world(rank, 3)
        shard = distributed.shard_batches(batches)
        assert [id(b) for b in shard] == [id(b) for b in batches[rank::3]]
        assert count_targets(shard) == (tokens, sequences)  # full-set N on every rank
        seen += [id(b) for b in shard]
    assert sorted(seen) == sorted(id(b) for b in batches)
    fake_world(0, 3)
    assert [distributed.owns(i) for i in range(7)] == [True, False, False] * 2 + [True]


def test_one_process_is_the_identity() -> None:
    distributed.reset_for_tests()
    batches = _batches()
    assert distributed.shard_batches(batches) is batches
    t = torch.arange(4.0)
    assert distributed.sum_(t) is t and torch.equal(t, torch.arange(4.0))
    assert distributed.sum_optional(None, t) is None and distributed.sum_int(5) == 5
    assert distributed.world().is_writer and not distributed.world().distributed


def test_unreduced_metric_is_refused_under_torchrun(
    fake_world, cli, store_path, tmp_path, monkeypatch
) -> None:
    (tmp_path / "dist_plugin.py").write_text(
        "import torch\n\ndef my_metric(ctx):\n"
        "    return {n: torch.ones_like(p) for n, p in ctx.parameters.items()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ok = cli("score", "--model", "toy", "--metric", "dist_plugin:my_metric")
    assert ok.exit_code == 0, ok.output  # the plugin works in one process
    before = _n_runs(store_path)
    fake_world(0, 2)
    with pytest.raises(InvalidInput, match="torchrun"):
        distributed.check_metric("my_metric")
    distributed.check_metric("grad_x_weight")  # reduced: accepted
    result = cli("score", "--model", "toy", "--metric", "dist_plugin:my_metric")
    assert result.exit_code == 1 and "torchrun" in result.output
    assert _n_runs(store_path) == before


def _n_runs(store_path) -> int:
    import duckdb

    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
    finally:
        con.close()
