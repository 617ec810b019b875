"""Data parallelism under torchrun: one process per rank, rank 0 alone writes.

When cwa runs under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the
environment, ``WORLD_SIZE > 1``), :func:`world` initialises ``torch.distributed`` once (gloo on
CPU, NCCL when CUDA is available) and every rank runs the same stage code:

* scoring shards the calibration batches round-robin (:func:`shard_batches`); metrics weight
  each batch by the *global* target count (carried by the shard, see
  :func:`cwa.metrics.base.count_targets`) and all-reduce their accumulators in float32
  (:func:`sum_`; spike maxima with :func:`max_`) before any non-linear step (abs, sqrt,
  division, argmax), so the scores
  equal the single-process ones up to summation order;
* evaluation plans its batches exactly as one process would and each rank computes every
  ``world_size``-th batch (:func:`owns`); the per-request results are summed across ranks
  (each entry is non-zero on one rank only, so the sum is exact) and every rank sees them all;
* :func:`run_stage` replaces :func:`cwa.lifecycle.execute_stage`: rank 0 registers the run
  (recording the world size), computes and writes; the other ranks compute into a scratch
  folder that is deleted afterwards and never open the store for writing.

With one process every function here is the identity, so the code path is the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from cwa.lifecycle import RunContext, RunOutcome, StageOutput, StageRequest
    from cwa.progress import Reporter
    from cwa.store import Store

# Metrics whose accumulators are all-reduced (the others refuse to run on several ranks).
DISTRIBUTED_METRICS = frozenset(
    {
        "grad_x_weight",
        "grad_squared",
        "hutchinson_diag",
        "obd",
        "wanda",
        "super_weight",
        "magnitude",
        "random",
    }
)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise InvalidInput(f"environment variable {name}={text!r} is not an integer") from exc


def world() -> World:
    """This process's place in the torchrun world (initialising the process group once)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        backend = str(dist.get_backend())
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    _WORLD = World(rank, size, local_rank, backend)
    return _WORLD


def reset_for_tests() -> None:
    """Forget the cached world (tests that change the environment)."""
    global _WORLD
    _WORLD = None


def check_metric(metric: str) -> None:
    """Refuse a metric whose accumulators are not reduced across ranks (before registering)."""
    if world().distributed and metric not in DISTRIBUTED_METRICS:
        raise InvalidInput(
            f"metric {metric!r} does not support torchrun data parallelism; run it in one "
            f"process or use one of {', '.join(sorted(DISTRIBUTED_METRICS))}"
        )


# -- collectives (identity with one process) ---------------------------------------------------


def _reduce(tensor: torch.Tensor, op_name: str) -> torch.Tensor:
    w = world()
    if not w.distributed:
        return tensor
    import torch
    import torch.distributed as dist

    op = getattr(dist.ReduceOp, op_name)
    if w.backend == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", w.local_rank))
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
    elif w.backend != "nccl" and tensor.device.type != "cpu":
        moved = tensor.cpu()
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` in place by SUM (float32 / float64 accumulators); returns it."""
    return _reduce(tensor, "SUM")


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` in place by MAX (spike maxima); returns it."""
    return _reduce(tensor, "MAX")


def sum_optional(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Sum an accumulator that a rank may not have (None = zeros of ``like``'s shape).

    Every rank must call this for the same tensors in the same order; with one process a None
    stays None (the caller's "not reached" meaning is kept).
    """
    if not world().distributed:
        return tensor
    import torch

    if tensor is None:
        tensor = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return sum_(tensor)


def sum_int(value: int) -> int:
    if not world().distributed:
        return int(value)
    import torch

    t = torch.tensor([int(value)], dtype=torch.int64)
    return int(sum_(t)[0])


def owns(index: int) -> bool:
    """Whether this rank computes work item ``index`` (round-robin over ranks)."""
    w = world()
    return index % w.world_size == w.rank


def barrier() -> None:
    w = world()
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    w = world()
    if not w.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_writer else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- sharded calibration batches ---------------------------------------------------------------


class BatchShard(list):
    """This rank's calibration batches, carrying the whole set's target counts."""

    global_counts: tuple[int, int]


def shard_batches(batches: Sequence[Any] | None) -> Sequence[Any] | None:
    """Round-robin share of ``batches`` for this rank (the list itself with one process).

    The shard remembers the whole set's (target tokens, sequences) so that metrics weight
    every batch by the full-set count N and the reduced result is the full-set mean.
    """
    w = world()
    if batches is None or not w.distributed:
        return batches
    from cwa.metrics.base import count_targets

    totals = count_targets(batches)
    shard = BatchShard(b for i, b in enumerate(batches) if i % w.world_size == w.rank)
    shard.global_counts = totals
    return shard


# -- stages ------------------------------------------------------------------------------------


def _worker_context(
    run_id: str, request: StageRequest, reporter: Reporter, scratch: Path
) -> RunContext:
    """What a non-zero rank's compute sees instead of a registered run's context: the same
    context with no store, and artifacts in a scratch folder."""
    from cwa.lifecycle import RunContext

    class _WorkerContext(RunContext):
        @property
        def artifacts_dir(self) -> Path:
            return scratch

    return _WorkerContext(None, run_id, request, reporter)  # type: ignore[arg-type]


def run_stage(
    store: Store,
    request: StageRequest,
    compute: Callable[[RunContext], StageOutput],
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> RunOutcome:
    """:func:`cwa.lifecycle.execute_stage` for every rank of a torchrun world.

    Rank 0 registers the run (its config records ``world_size``), computes and writes. Other
    ranks receive rank 0's run id, compute the same stage (taking part in every collective)
    with artifacts in a scratch folder that is removed afterwards, and write nothing.
    """
    from cwa.lifecycle import RunOutcome, execute_stage
    from cwa.progress import NULL_REPORTER

    w = world()
    if not w.distributed:
        return execute_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
    request.config["world_size"] = w.world_size
    if w.is_writer:

        def compute_on_writer(ctx: RunContext) -> StageOutput:
            broadcast_object(ctx.run_id)
            return compute(ctx)

        return execute_stage(store, request, compute_on_writer, reporter=reporter, mlflow=mlflow)
    run_id = str(broadcast_object(None))
    scratch = Path(tempfile.mkdtemp(prefix=f"cwa-rank{w.rank}-"))
    try:
        ctx = _worker_context(run_id, request, reporter or NULL_REPORTER, scratch)
        output = compute(ctx)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RunOutcome(
        run_id=run_id,
        stage=request.stage,
        status="succeeded",
        metrics=dict(output.metrics),
        artifacts_dir=store.artifacts_dir(run_id),
        mlflow_run_id=None,
        value=output.value,
    )
