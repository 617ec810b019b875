"""`cwa evaluate` against lm-evaluation-harness: whole process, same model folder, same files.

Both tools evaluate HellaSwag (acc, acc_norm) and LAMBADA (acc, perplexity) on the first
``--n-items`` records of the same jsonl files (written to a temporary folder, so both see exactly
the same items), with the same batch size, on the CPU in float32. Each tool runs once untimed
(warm caches: cwa's store, the harness's dataset cache, the OS file cache; ``--warmup``), then
``--repeats`` times timed; cwa runs as it does by default (runs mirrored to MLflow by a
detached process, :mod:`cwa.mlflow_background`), with ``--no-mlflow`` (``cwa-nomlf``) and, with
``--inline``, mirroring before it returns (``cwa-inline``). Per run the whole process's wall
time, peak RSS and CPU time (``os.wait4``) are taken; for the default cwa the script then waits
for the detached mirror (so it steals no CPU from the next run) and reports when it had
finished, its peak RSS and CPU time (sampled from ``/proc``). Medians are printed side by side
with the metrics, with ratios by wall time (the target) and by CPU time (steadier on a shared
machine).

lm-evaluation-harness is installed in its own virtual environment (``--venv``, created if
missing): ``python -m venv DIR``, then ``DIR/bin/pip install torch==<this torch>`` FIRST (the same
build as here, so the harness cannot pull another torch), then ``lm-eval[hf]``; the script
checks torch kept its version and otherwise skips the harness with a message (also when
anything cannot be installed). Its tasks are local-file copies of the harness's own
``hellaswag`` and ``lambada_openai`` YAMLs (the same ``process_docs``, templates and metrics)
written to a temporary ``--include_path``.

    python benchmarks/bench_vs_lmeval.py [--model FOLDER] [--hellaswag F] [--lambada F]
        [--n-items 200] [--batch-size 16] [--repeats 3] [--threads 1] [--venv DIR]

Defaults: the toy GPT-2 and the toy task files (``$CWA_CACHE``); 1 thread in both tools (a
small shared CPU; extra OpenMP threads spin against other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HARNESS_SPEC = "lm-eval[hf]>=0.4.13"
HELLASWAG_YAML = """task: cwa_bench_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LAMBADA_YAML = """task: cwa_bench_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# The harness's own HellaSwag preprocessing, imported from the installed harness.
UTILS_PY = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"


def _defaults(args: argparse.Namespace) -> None:
    if args.model and args.hellaswag and args.lambada:
        return
    from cwa.toy.cache import ensure_toy_model, toy_data_path

    args.model = args.model or str(ensure_toy_model("gpt2"))
    args.hellaswag = args.hellaswag or str(toy_data_path("hellaswag"))
    args.lambada = args.lambada or str(toy_data_path("lambada"))


def _head(src: str, dst: Path, n: int) -> Path:
    lines = [line for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    dst.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return dst


def _pip(venv: Path, *packages: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", *packages],
        capture_output=True,
        text=True,
    )


def _venv_torch(venv: Path) -> str | None:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_harness(venv: Path) -> str | None:
    """None when the harness is ready in ``venv``, else why it is skipped."""
    import torch

    want = torch.__version__
    if not (venv / "bin" / "python").is_file():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
        if made.returncode != 0:
            return f"could not create the virtual environment {venv}"
    if _venv_torch(venv) != want:
        if _pip(venv, f"torch=={want}").returncode != 0:
            return f"could not install torch=={want} into {venv}"
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import lm_eval, transformers"], capture_output=True
    )
    if check.returncode != 0 and _pip(venv, HARNESS_SPEC).returncode != 0:
        return f"could not install {HARNESS_SPEC} into {venv}"
    got = _venv_torch(venv)
    if got != want:
        return f"installing the harness changed torch to {got} (wanted {want}); not comparable"
    return None


@dataclass
class Measure:
    """One whole-process run: wall seconds until the command returned, peak RSS (GiB), CPU
    seconds (user + system); for cwa's detached MLflow mirror also when it had finished
    (``done``, from the start of the command), its own peak RSS and CPU seconds."""

    wall: float
    rss: float
    cpu: float
    done: float
    mirror_rss: float = 0.0
    mirror_cpu: float = 0.0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_sample(pid: int) -> tuple[float, float] | None:
    """(peak RSS GiB so far, CPU seconds so far) of a live process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if stat[0] == "Z":
        return None
    hwm = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")), 0)
    return hwm / 2**20, (int(stat[11]) + int(stat[12])) / _TICK


def _wait_mirror(store: Path, start: float) -> tuple[float, float, float]:
    """Wait for cwa's detached MLflow mirror workers of ``store`` (pids in the queue's markers,
    cwa.mlflow_background) to exit: (finished at, s since ``start``; peak RSS GiB; CPU s)."""
    queue = store / "mlflow-pending"
    pids = set()
    if queue.is_dir():
        for marker in queue.iterdir():
            text = marker.read_text().strip() if not marker.name.startswith(".") else ""
            if text.isdigit():
                pids.add(int(text))
    rss = cpu = 0.0
    last: dict[int, tuple[float, float]] = {}
    while pids:
        for pid in list(pids):
            sample = _proc_sample(pid)
            if sample is None:
                pids.discard(pid)
            else:
                last[pid] = sample
        time.sleep(0.02)
    for peak, used in last.values():  # the last sample before each worker exited
        rss, cpu = max(rss, peak), cpu + used
    leftover = sorted(p.name for p in queue.iterdir() if not p.name.startswith(".")) if (
        queue.is_dir()) else []  # fmt: skip
    if leftover:
        raise RuntimeError(f"the MLflow mirror left runs unmirrored: {leftover}")
    return time.perf_counter() - start, rss, cpu


def _timed(cmd: list[str], env: dict[str, str], log: Path, store: Path | None = None) -> Measure:
    """One whole process; with ``store``, also waits for its detached MLflow mirror (so it
    steals no CPU from the next run) and measures it. Raises if the command fails."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    measure = Measure(wall, usage.ru_maxrss / 2**20, cpu, wall)  # ru_maxrss is in KiB on Linux
    if store is not None:
        measure.done, measure.mirror_rss, measure.mirror_cpu = _wait_mirror(store, start)
        measure.done = max(measure.done, wall)
    return measure


def cwa_command(args: argparse.Namespace, hs: Path, lam: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "cwa_cli", *flags, "evaluate", "--model", args.model,
        "--tasks", f"hellaswag:{hs},lambada:{lam}", "--batch-size", str(args.batch_size),
        "--dtype", "float32", "--device", "cpu", "--force", "--json",
    ]  # fmt: skip


def harness_command(args: argparse.Namespace, venv: Path, tasks: Path, out: Path) -> list[str]:
    return [
        str(venv / "bin" / "lm_eval"), "run", "--model", "hf",
        "--model_args", f"pretrained={args.model},dtype=float32",
        "--tasks", "cwa_bench_hellaswag,cwa_bench_lambada", "--include_path", str(tasks),
        "--batch_size", str(args.batch_size), "--device", "cpu", "--output_path", str(out),
    ]  # fmt: skip


def cwa_metrics(log: Path) -> dict[tuple[str, str], float]:
    text = log.read_text()
    start = 0 if text.startswith("{") else text.index("\n{") + 1  # progress lines come first
    rows = json.loads(text[start:])["results"]
    return {(r["task"], r["metric"]): float(r["value"]) for r in rows}


def harness_metrics(out: Path) -> dict[tuple[str, str], float]:
    newest = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(newest.read_text())["results"]
    got = {}
    for task, name in (("cwa_bench_hellaswag", "hellaswag"), ("cwa_bench_lambada", "lambada")):
        for key, value in results[task].items():
            metric, _, flt = key.partition(",")
            if flt == "none" and not metric.endswith("_stderr"):
                got[(name, metric)] = float(value)
    return got


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(runs: dict[str, list[Measure]]) -> None:
    """Medians side by side; ratios against lm-eval by wall time (the target) and CPU time
    (less sensitive to other processes on a shared machine)."""
    med = {n: {f: _median([getattr(m, f) for m in r]) for f in Measure.__dataclass_fields__}
           for n, r in runs.items()}  # fmt: skip
    print(f"\n{'':11}{'returned s':>11}{'mirror done s':>14}{'peak RSS GiB':>13}"
          f"{'mirror RSS':>11}{'CPU s':>8}   wall s of each run")  # fmt: skip
    for name, m in med.items():
        walls = ", ".join(f"{x.wall:.1f}" for x in runs[name])
        mirror = name == "cwa"
        print(f"{name:11}{m['wall']:>11.2f}{m['done'] if mirror else m['wall']:>14.2f}"
              f"{m['rss']:>13.3f}{m['mirror_rss'] if mirror else 0:>11.3f}"
              f"{m['cpu'] + m['mirror_cpu']:>8.1f}   {walls}")  # fmt: skip
    if "lm-eval" not in med:
        return
    ref = med["lm-eval"]
    print("\n(CPU s counts the detached mirror's CPU too; 'mirror done' is when it had finished)")
    for name in [n for n in med if n != "lm-eval"]:
        m = med[name]
        line = (f"{name} is {ref['wall'] / m['wall']:.2f}x as fast as lm-eval until it returns "
                f"(target >= 2)")  # fmt: skip
        if name == "cwa":
            line += f", {ref['wall'] / m['done']:.2f}x until its MLflow mirror had finished"
        line += (f"; {ref['cpu'] / (m['cpu'] + m['mirror_cpu']):.2f}x by CPU time; peak memory "
                 f"{m['rss'] / ref['rss']:.2f}x (target <= 0.8)")  # fmt: skip
        if name == "cwa":
            line += f", mirror process {m['mirror_rss'] / ref['rss']:.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--hellaswag")
    parser.add_argument("--lambada")
    parser.add_argument("--n-items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first")
    parser.add_argument(
        "--inline", action="store_true", help="also time cwa mirroring inline (CWA_MLFLOW_MODE)"
    )
    default_venv = Path(os.environ.get("CWA_CACHE") or Path.home() / ".cache" / "cwa")
    parser.add_argument("--venv", type=Path, default=default_venv / "bench-lmeval-venv")
    args = parser.parse_args()
    _defaults(args)

    work = Path(tempfile.mkdtemp(prefix="cwa-vs-lmeval-"))
    hs = _head(args.hellaswag, work / "hellaswag.jsonl", args.n_items)
    lam = _head(args.lambada, work / "lambada.jsonl", args.n_items)
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "cwa_bench_hellaswag.yaml").write_text(HELLASWAG_YAML.format(path=hs))
    (tasks / "cwa_bench_lambada.yaml").write_text(LAMBADA_YAML.format(path=lam))
    (tasks / "utils.py").write_text(UTILS_PY)

    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(CWA_STORE=str(work / "cwa_store"), HF_HOME=str(work / "hf_home"))
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")

    print(f"model {args.model}; {args.n_items} items per task; batch {args.batch_size}; "
          f"{args.threads} thread(s); {args.repeats} timed runs each after a warm-up")  # fmt: skip
    skip = ensure_harness(args.venv)
    if skip:
        print(f"lm-evaluation-harness skipped: {skip}")
    # cwa as it runs by default (runs mirrored to MLflow) and without the MLflow mirror.
    store = work / "cwa_store"
    tools = {  # name -> (command, env, store whose detached MLflow mirror to wait for)
        "cwa": (lambda: cwa_command(args, hs, lam), env, store),
        "cwa-nomlf": (lambda: cwa_command(args, hs, lam, "--no-mlflow"), env, None),
    }
    if args.inline:
        inline_env = {**env, "CWA_MLFLOW_MODE": "inline"}
        tools["cwa-inline"] = (lambda: cwa_command(args, hs, lam), inline_env, None)
    if not skip:
        out = work / "harness_out"
        tools["lm-eval"] = (lambda: harness_command(args, args.venv, tasks, out), env, None)
    runs: dict[str, list[Measure]] = {name: [] for name in tools}
    logs = {name: work / f"{name}.log" for name in tools}
    for repeat in range(args.warmup + args.repeats):
        for name, (command, tool_env, mirror_store) in tools.items():  # interleaved: load
            result = _timed(command(), tool_env, logs[name], mirror_store)  # drifts hit all
            if repeat >= args.warmup:  # warm-up runs fill caches and are not counted
                runs[name].append(result)
    metrics = {"cwa": cwa_metrics(logs["cwa"])}
    for variant in [n for n in tools if n.startswith("cwa-")]:
        if cwa_metrics(logs[variant]) != metrics["cwa"]:
            print(f"note: {variant} gave different numbers than cwa")
    if "lm-eval" in tools:
        metrics["lm-eval"] = harness_metrics(work / "harness_out")
    report(runs)
    print(f"\n{'task':10}{'metric':12}" + "".join(f"{n:>16}" for n in metrics) + "   |diff|")
    for key in sorted(metrics["cwa"]):
        values = [metrics[n].get(key) for n in metrics]
        cells = "".join(f"{v:>16.6f}" if v is not None else f"{'-':>16}" for v in values)
        diff = abs(values[0] - values[1]) if len(values) == 2 and None not in values else None
        print(f"{key[0]:10}{key[1]:12}{cells}   {'' if diff is None else f'{diff:.2e}'}")
    print(f"\nlogs and inputs: {work}")


if __name__ == "__main__":
    main()
