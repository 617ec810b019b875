"""``--device-map``: a model spread by an explicit module -> device map (CPU and disk offload)
gives the same scores, evaluations and perturbations as the plain load; bad maps are refused
before a run is registered."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import torch

from cwa.errors import InvalidInput

CPU_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
           "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
DISK_MAP = {**CPU_MAP, "transformer.h.1": "disk"}


def _write(tmp_path: Path, name: str, mapping: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(mapping) if not isinstance(mapping, str) else mapping)
    return str(path)


def _query(store_path: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _runs(store_path: Path) -> list[tuple]:
    return _query(store_path, "SELECT run_id, stage, status FROM runs ORDER BY run_id")


@pytest.mark.parametrize(
    "mapping, message",
    [
        ("{not json", "not valid JSON"),
        ([["transformer.wte", "cpu"]], "JSON object"),
        ({**CPU_MAP, "transformer.h.1": "gpu"}, "not a device"),
        ({**CPU_MAP, "transformer.h.7": "cpu"}, "not a module"),
        ({k: v for k, v in CPU_MAP.items() if k != "transformer.h.1"}, "places no module"),
    ],
)
def test_bad_map_registers_nothing(cli, store_path, tmp_path, toy_env, mapping, message) -> None:
    path = _write(tmp_path, "map.json", mapping)
    assert cli("score", "--model", "toy", "--metric", "magnitude").exit_code == 0
    assert cli("rank", "latest:score", "--topk", "20").exit_code == 0
    before = _runs(store_path)
    for args in (
        ["score", "--model", "toy", "--metric", "magnitude", "--device-map", path],
        ["evaluate", "--model", "toy", "--tasks", "perplexity", "--limit", "4",
         "--device-map", path],
        ["rank", "latest:score", "--topk", "10", "--device-map", path],
        ["perturb", "latest:rank", "--device-map", path, "--limit", "4"],
    ):  # fmt: skip
        result = cli(*args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert _runs(store_path) == before
    result = cli("score", "--model", "toy", "--device-map", str(tmp_path / "absent.json"))
    assert result.exit_code != 0 and "JSON file" in result.output


def test_offloaded_weights_refused_where_gradients_or_edits_need_them(
    cli, store_path, tmp_path, toy_env
) -> None:
    path = _write(tmp_path, "disk.json", DISK_MAP)
    assert cli("score", "--model", "toy", "--metric", "magnitude").exit_code == 0
    before = _runs(store_path)
    result = cli("score", "--model", "toy", "--metric", "grad_x_weight", "--device-map", path)
    assert result.exit_code != 0 and "offloads" in result.output
    assert _runs(store_path) == before


def test_offloaded_model_equals_plain_load(toy_env, one_thread) -> None:
    from cwa.evaluation.engine import Window, score_windows
    from cwa.models.loading import load_model

    plain = load_model("toy", device="cpu")
    mapped = load_model("toy", device="cpu", device_map=DISK_MAP)
    assert mapped.device == "cpu+disk"
    assert any(p.device.type == "meta" for p in mapped.model.parameters())
    assert mapped.fingerprint == plain.fingerprint  # offloaded weights are hashed from disk
    ids = torch.arange(1, 33).reshape(2, 16) % plain.model.config.vocab_size
    windows = [Window(row, 0) for row in ids]
    nll_a, n_a = score_windows(plain.model, windows, batch_size=2)
    nll_b, n_b = score_windows(mapped.model, windows, batch_size=2)
    torch.testing.assert_close(nll_b, nll_a, rtol=0, atol=0)
    assert torch.equal(n_a, n_b)
    with pytest.raises(InvalidInput, match="offloads"):
        from cwa.models.device_map import require_materialized

        require_materialized(mapped.model, "perturb")


@pytest.mark.slow
def test_mapped_runs_equal_plain_runs(cli, store_path, tmp_path, toy_env, one_thread) -> None:
    """score (wanda: activation hooks), rank, perturb and evaluate through the CLI, once plain
    and once with explicit map files: identical scores, rankings and perplexities."""
    from cwa.scorefile import open_scores

    cpu_map = _write(tmp_path, "cpu.json", CPU_MAP)
    disk_map = _write(tmp_path, "disk.json", DISK_MAP)
    ids = {}
    for label, extra in (("plain", []), ("mapped", ["--device-map", cpu_map])):
        result = cli("score", "--model", "toy", "--metric", "wanda", *extra)
        assert result.exit_code == 0, result.output
        ids[f"score_{label}"] = _runs(store_path)[-1][0]
        result = cli("rank", ids[f"score_{label}"], "--topk", "5%", *extra)
        assert result.exit_code == 0, result.output
        ids[f"rank_{label}"] = _runs(store_path)[-1][0]
        result = cli("perturb", ids[f"rank_{label}"], "--k-values", "1%,5%",
                     "--controls", "random_k", "--limit", "8", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        ids[f"perturb_{label}"] = _runs(store_path)[-1][0]
    art = store_path / "artifacts"
    with (open_scores(art / ids["score_plain"] / "scores.safetensors") as a,
          open_scores(art / ids["score_mapped"] / "scores.safetensors") as b):  # fmt: skip
        assert a.names() == b.names()
        for name in a.names():
            torch.testing.assert_close(b.get(name), a.get(name), rtol=0, atol=0)
    assert (art / ids["rank_plain"] / "selection.bin").read_bytes() == (
        art / ids["rank_mapped"] / "selection.bin"
    ).read_bytes()

    def results(run_id: str) -> list[tuple]:
        return _query(
            store_path,
            "SELECT c.condition_id, c.k, c.n_changed, c.restored, e.value FROM evaluations e "
            "LEFT JOIN perturbation_conditions c USING (run_id, condition_id) "
            "WHERE e.run_id = ? AND e.metric = 'perplexity' ORDER BY c.condition_id NULLS FIRST",
            [run_id],
        )

    plain, mapped = results(ids["perturb_plain"]), results(ids["perturb_mapped"])
    assert len(plain) == 5 and plain == mapped
    assert all(row[3] for row in plain[1:])
    values = []
    for extra in ([], ["--device-map", disk_map]):
        result = cli("evaluate", "--model", "toy", "--tasks", "perplexity", "--limit", "8",
                     "--force", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        run_id = _runs(store_path)[-1][0]
        values.append(
            _query(store_path, "SELECT task, metric, value FROM evaluations WHERE run_id = ? "
                   "ORDER BY metric", [run_id])  # fmt: skip
        )
    assert values[0] == values[1] and values[0]


@pytest.mark.parametrize("metric", ["wanda", "grad_x_weight", "super_weight"])
def test_scores_under_accelerate_hooks_equal_plain(tmp_path, toy_env, one_thread, metric) -> None:
    """Every module wrapped in accelerate's device-aligning hooks (as a device map does; one
    device here, hooks forced): activation hooks, gradients and the loss give the same scores."""
    from accelerate import dispatch_model

    from cwa.metrics import score_model
    from cwa.models.loading import load_model
    from cwa.scorefile import load_scores

    plain = load_model("toy", device="cpu")
    hooked = load_model("toy", device="cpu")
    dispatch_model(hooked.model, device_map=CPU_MAP, main_device="cpu", force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in hooked.model.modules())
    ids = torch.arange(2, 66).reshape(4, 16) % plain.model.config.vocab_size
    batches = [
        {"input_ids": part, "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        for part in (ids[:2], ids[2:])
    ]
    batches[1]["attention_mask"][1, 12:] = 0  # padding must stay excluded under the hooks
    a = score_model(plain.model, batches, metric, arch=plain.arch, out_path=tmp_path / "a")
    b = score_model(hooked.model, batches, metric, arch=hooked.arch, out_path=tmp_path / "b")
    sa, sb = load_scores(a.score_path), load_scores(b.score_path)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-6, atol=1e-9)
