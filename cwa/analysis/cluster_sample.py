"""Which weights the ``clusters`` analyzer clusters, and their raw values, in one pass.

The union of the first score run's global top-N (the exact ``cwa rank`` order: score desc, then
parameter order, then flat index; NaN = not scored, never ranked) and a seeded uniform sample
(:func:`cwa.perturbation.selection.random_k`), gathered with every score run's value, |w| and
the element's layer and component while reading each file once, tensor by tensor
(:func:`gather_sample`). See :mod:`cwa.analysis.clustering` for the features and the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput


def common_tensors(score_paths: Sequence[Path], arch: Any) -> list[str]:
    """Tensors scored by every score run, in architecture order."""
    from cwa.scorefile import read_score_header

    headers = [read_score_header(p)[0] for p in score_paths]
    for path, header in zip(score_paths, headers, strict=True):
        unknown = [n for n in header if n not in arch.params]
        if unknown:
            raise InvalidInput(
                f"score file {path} has tensor {unknown[0]!r} that the model lacks; cluster "
                "score runs of one model"
            )
    names = [n for n in arch.params if all(n in h for h in headers)]
    if not names:
        raise InvalidInput("the score runs share no scored tensor; cluster runs of one model")
    return names


def gather_sample(
    score_paths: Sequence[Path],
    names: Sequence[str],
    numels: Sequence[int],
    top_n: int,
    sample_size: int,
    seed: int,
    *,
    arch: Any = None,
    weights: Any = None,
) -> Any:
    """The sampled weights and their raw values, in ONE pass over every file (tensor by tensor).

    The uniform sample is drawn first (it needs only the sizes); then for each tensor, in
    lockstep over the score files (and the checkpoint when ``weights`` is given): its local
    top-N by the first run's scores is offered to the running global top-N, and every score run
    (and |w|) is gathered at the union of that local top-N and the tensor's sampled indices. A
    weight of the final global top-N is in its tensor's local top-N (same order, same ties), so
    after the pass the rows kept are exactly the global top-N plus the sample. Extra memory: one
    tensor per file plus O(N) candidates per tensor.

    Returns a polars frame: parameter, flat_index, in_top_n, score_0.. and, with ``arch``,
    layer, component, depth and abs_weight (NaN without ``weights``), in parameter then flat
    order.
    """
    from contextlib import ExitStack

    import numpy as np
    import polars as pl
    import torch

    from cwa.models.architecture import COMPONENTS
    from cwa.perturbation.scope import ScopeEntry
    from cwa.perturbation.selection import random_k
    from cwa.ranking import RunningTopK
    from cwa.scorefile import open_scores

    total = int(sum(numels))
    drawn: dict[str, Any] = {}
    if sample_size:
        scope = [ScopeEntry(n, int(c)) for n, c in zip(names, numels, strict=True)]
        drawn = random_k(scope, min(sample_size, total), seed)
    top = RunningTopK(top_n) if top_n else None
    gathered: list[tuple[int, str, Any, dict[str, Any]]] = []
    with ExitStack() as stack:
        readers = [stack.enter_context(open_scores(p)) for p in score_paths]
        for position, name in enumerate(names):
            scores = readers[0].get(name).to(torch.float32).reshape(-1)
            values = scores.numpy()
            local = np.empty(0, dtype=np.int64)
            if top is not None:
                local = _local_top(scores, top, top_n)
                if local.size:
                    top.offer(position, values[local], local)
            sampled = drawn[name].numpy() if name in drawn else np.empty(0, dtype=np.int64)
            flats = np.union1d(local, sampled).astype(np.int64)
            if flats.size == 0:
                continue
            cols: dict[str, Any] = {"score_0": values[flats].astype(np.float64)}
            del values
            index = torch.from_numpy(flats)
            for i, reader in enumerate(readers[1:], start=1):
                cols[f"score_{i}"] = reader.get(name).reshape(-1)[index].double().numpy()
            if arch is not None:
                info = arch.params[name]
                if weights is not None:
                    tensor = weights.get(name).reshape(-1)
                    cols["abs_weight"] = tensor[index].abs().double().numpy()
                    del tensor
                else:
                    cols["abs_weight"] = np.full(flats.size, np.nan)
                if len(info.components) == 1:
                    cols["component"] = [info.components[0]] * flats.size
                else:
                    ids = arch.component_ids(name).reshape(-1)[index].tolist()
                    cols["component"] = [COMPONENTS[c] for c in ids]
                cols["layer"] = [info.layer] * flats.size
                cols["depth"] = np.full(
                    flats.size, _depth(info.layer, info.components, arch.n_layers)
                )
            gathered.append((position, name, flats, cols))
    frames = []
    for position, name, flats, cols in gathered:
        in_top = (
            np.isin(flats, top.flats[top.positions == position])
            if top is not None
            else np.zeros(flats.size, dtype=bool)
        )
        keep = in_top | np.isin(flats, drawn[name].numpy() if name in drawn else [])
        if not keep.any():
            continue
        frame = pl.DataFrame(
            {"parameter": [name] * int(keep.sum()), "flat_index": flats[keep],
             "in_top_n": in_top[keep]},
            schema_overrides={"parameter": pl.String, "flat_index": pl.Int64},
        )  # fmt: skip
        extra = {
            key: ([v for v, k in zip(value, keep, strict=True) if k] if isinstance(value, list)
                  else value[keep])
            for key, value in cols.items()
        }  # fmt: skip
        frames.append(frame.with_columns(pl.DataFrame(extra, strict=False)))
    return pl.concat(frames, how="vertical_relaxed")


def _local_top(scores: Any, top: Any, n: int) -> Any:
    """Ascending flat indices of the tensor's top-n scores (value desc, then flat index asc)
    that can still enter the running global top-n; NaN (not scored) never does.

    A cheap threshold first (the global n-th key once the running set is full, else a lower
    bound of the tensor's own n-th value), then an exact tie-aware top-n
    (:func:`cwa.ranking._top_indices`) on the few candidates: no sort, partition or top-k
    selection over a large tensor.
    """
    import math

    import numpy as np

    from cwa.ranking import _top_indices

    values = scores.numpy()
    if scores.numel() == 0:
        return np.empty(0, dtype=np.int64)
    if top.full:
        threshold = float(top.keys[-1])
        if float(scores.max()) <= threshold:  # nothing here can enter (NaN max: look closer)
            return np.empty(0, dtype=np.int64)
        flats = np.flatnonzero(values > threshold)  # NaN compares False
    elif scores.numel() <= 2 * n:
        flats = np.flatnonzero(~np.isnan(values))
    else:
        # A lower bound of the tensor's n-th largest value without selecting it: the smallest
        # of the maxima of n disjoint chunks (n distinct elements are at least that large).
        has_nan = math.isnan(float(scores.max()))  # max propagates NaN; cheaper than isnan
        finite = scores.nan_to_num(-np.inf) if has_nan else scores
        chunk = finite.numel() // n
        bound = float(finite[: chunk * n].reshape(n, chunk).amax(dim=1).min())
        flats = np.flatnonzero(values >= bound)
    if flats.size > n:
        flats = flats[_top_indices(values[flats], n)]
    return flats.astype(np.int64)


def sample_weights(
    score_path: Path,
    names: Sequence[str],
    numels: Sequence[int],
    top_n: int,
    sample_size: int,
    seed: int,
) -> Any:
    """Union of the global top-N of ``score_path`` over ``names`` and a seeded uniform sample:
    a polars frame (parameter, flat_index, in_top_n) in parameter then flat order."""
    sample = gather_sample([score_path], names, numels, top_n, sample_size, seed)
    return sample.select("parameter", "flat_index", "in_top_n")


def _depth(layer: int | None, components: tuple[str, ...], n_layers: int) -> float:
    if layer is not None and n_layers > 0:
        return (layer + 0.5) / n_layers
    return 0.0 if any(c in ("embed", "pos_embed") for c in components) else 1.0
