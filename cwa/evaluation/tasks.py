"""``TASK:SOURCE`` specs, their resolution into :class:`TaskPlan`\\ s and the config hash.

A spec is ``TASK`` or ``TASK:SOURCE`` where SOURCE is ``toy``, ``hf`` (the task's default hub
dataset), ``hf:NAME[:CONFIG]:SPLIT`` (``hf:NAME[:CONFIG]:SPLIT:COLUMN`` for perplexity) or a
local file path. Without a source the toy model gets the toy data and any other model the hub
dataset. Several specs may be given as a list or one comma-separated string.

The task configuration hash is the sha256 of the canonical JSON (sorted keys, no spaces) of:
task name and version, the harness version matched (HellaSwag/LAMBADA), the source identity
(content sha256 of a toy or local file -- not its path --, the normalised spec of a hub
dataset), ``limit``, ``seed`` (only when ``limit`` subsamples; without a limit the seed changes
nothing) and the options that change the task's numbers (perplexity: ``seq_len`` -- ``"auto"``
when left to the model --, ``stride``, ``text_column``, ``heldout_fraction``,
``add_bos_token``; HellaSwag and LAMBADA: ``add_bos_token``). Batch size and reporter do not
enter it. Combined with the evaluation key (:mod:`cwa.evaluation.identity`: weights, tokenizer,
dtype, attention, engine version) it identifies a result that can be reused. Planning needs no
model and no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Importing the task modules registers them in TASKS.
import cwa.evaluation.hellaswag  # noqa: F401
import cwa.evaluation.lambada  # noqa: F401
import cwa.evaluation.perplexity  # noqa: F401
from cwa.data.text import parse_hf_spec
from cwa.errors import DataError, InvalidInput
from cwa.evaluation.base import (
    HARNESS_VERSION,
    TASKS,
    EvalTask,
    SourceRef,
    TaskPlan,
    check_limit,
)
from cwa.evaluation.perplexity import HELDOUT_FRACTION, PerplexityTask
from cwa.file_digest import file_sha256

__all__ = ["TASKS", "TaskPlan", "config_hash", "parse_task_spec", "plan_tasks", "split_specs"]


def split_specs(task_specs: str | Sequence[str]) -> list[str]:
    """A list of specs from a list or a comma-separated string (empty entries dropped)."""
    raw = task_specs.split(",") if isinstance(task_specs, str) else list(task_specs)
    specs = [s.strip() for s in raw if s and s.strip()]
    if not specs:
        raise InvalidInput(
            f"no task given; choose from: {', '.join(TASKS.names())} (e.g. --tasks perplexity)"
        )
    return specs


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """``"hellaswag:items.jsonl"`` -> (canonical task name, source or None)."""
    name, sep, source = spec.strip().partition(":")
    if not name:
        raise InvalidInput(f"task spec {spec!r} has no task name; write TASK or TASK:SOURCE")
    canonical = TASKS.canonical(name)
    if sep and not source.strip():
        raise InvalidInput(f"task spec {spec!r} has an empty source; write TASK:SOURCE")
    return canonical, (source.strip() if sep else None)


def resolve_source(task: type[EvalTask], source: str | None, *, is_toy_model: bool) -> SourceRef:
    """Turn a spec's SOURCE (or its absence) into a :class:`SourceRef`."""
    if source is None:
        source = "toy" if is_toy_model else "hf"
    if source == "toy":
        import cwa.toy as toy

        path = Path(toy.toy_data_path(task.toy_data))
        if not path.is_file():
            raise DataError(f"toy data {task.toy_data!r} is missing at {path}; run `cwa toy build`")
        identity = {"kind": "toy", "data": task.toy_data, "sha256": file_sha256(path)}
        return SourceRef("toy", str(path), identity)
    if source == "hf":
        return SourceRef("hf", task.hub_default, {"kind": "hf", "spec": task.hub_default}, True)
    if source.startswith("hf:"):
        with_column = task is PerplexityTask or issubclass(task, PerplexityTask)
        parts = parse_hf_spec(source, with_column=with_column)
        spec = "hf:" + ":".join(
            str(parts[k]) for k in ("name", "config", "split", "column") if parts[k] is not None
        )
        return SourceRef("hf", spec, {"kind": "hf", "spec": spec})
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"{task.name} data file {source!r} does not exist; give an existing file, 'toy' or 'hf'"
        )
    resolved = path.resolve()
    identity = {"kind": "file", "suffix": resolved.suffix.lower(), "sha256": file_sha256(resolved)}
    return SourceRef("file", str(resolved), identity)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a task configuration."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def perplexity_scope(
    source: SourceRef,
    text_column: str | None,
    heldout_fraction: float | None,
    calibration: Sequence[dict[str, Any]],
) -> tuple[float, str | None]:
    """(fraction of the stream to score from its end, note for the user).

    1.0 (the whole text) unless the source is a calibration text of the evaluated run --
    then its held-out tail, with that run's fraction -- or ``heldout_fraction`` is explicit.
    """
    from cwa.data.calibration import source_match_key

    sha = source.identity.get("sha256")
    location = source.location
    if source.kind == "hf" and text_column:
        parts = parse_hf_spec(location, with_column=True)
        parts["column"] = text_column
        location = "hf:" + ":".join(
            str(parts[k]) for k in ("name", "config", "split", "column") if parts[k]
        )
    key = source_match_key(source.kind, location, sha)
    for record in calibration:
        if record.get("match_key") == key:
            recorded = record.get("heldout_fraction") or HELDOUT_FRACTION
            fraction = heldout_fraction or float(recorded)
            return fraction, (
                f"held-out part only: the last {fraction:.0%} of {source.describe()}, which is "
                f"the calibration text of run {record.get('run_id', '?')}"
            )
    if heldout_fraction is not None:
        return heldout_fraction, (
            f"held-out part only: the last {heldout_fraction:.0%} of {source.describe()} "
            "(--heldout-fraction)"
        )
    return 1.0, None


def _check_positive(name: str, value: int | None, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"--{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def plan_tasks(
    task_specs: str | Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    stride: int | None = None,
    is_toy_model: bool = False,
    add_bos_token: bool | None = None,
    text_column: str | None = None,
    heldout_fraction: float | None = None,
    calibration: Sequence[dict[str, Any]] = (),
) -> list[TaskPlan]:
    """Resolve specs into plans (sources located and hashed, options validated).

    ``calibration``: records of the calibration text(s) of the runs being evaluated
    (``{"match_key", "heldout_fraction", "run_id"}``, see :func:`perplexity_scope`);
    ``heldout_fraction``: an explicit ``--heldout-fraction`` for perplexity.
    """
    limit = check_limit(limit)
    if heldout_fraction is not None and not 0.0 < heldout_fraction < 1.0:
        raise InvalidInput(
            f"--heldout-fraction must be between 0 and 1 (exclusive), got {heldout_fraction}"
        )
    seq_len = _check_positive("seq-len", seq_len, 2)
    stride = _check_positive("stride", stride, 1)
    if seq_len is not None and stride is not None and stride > seq_len:
        raise InvalidInput(f"--stride {stride} is larger than --seq-len {seq_len}")
    plans: list[TaskPlan] = []
    for spec in split_specs(task_specs):
        name, source_text = parse_task_spec(spec)
        task = TASKS.get(name)
        source = resolve_source(task, source_text, is_toy_model=is_toy_model)
        options: dict[str, Any] = {"add_bos_token": add_bos_token}
        if issubclass(task, PerplexityTask):
            fraction, note = perplexity_scope(source, text_column, heldout_fraction, calibration)
            options = {
                "seq_len": seq_len,
                "stride": stride,
                "text_column": text_column,
                "heldout_fraction": fraction,
                "add_bos_token": add_bos_token,
                "note": note,
            }
        config: dict[str, Any] = {
            "task": task.name,
            "task_version": task.version,
            "source": source.identity,
            "limit": limit,
            "seed": seed if limit is not None else None,
        }
        if not issubclass(task, PerplexityTask):
            config["harness"] = HARNESS_VERSION
        for key in task.relevant_options:
            value = options.get(key)
            config[key] = "auto" if key == "seq_len" and value is None else value
        plans.append(
            TaskPlan(task.name, source, limit, int(seed), options, config, config_hash(config))
        )
    return plans
