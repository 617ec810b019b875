"""Pruning-scale selections: the k best (or worst) weights for k up to all, stored compactly.

Rankings of a few thousand weights live as rows in ``ranked_weights``; a 50% selection of a
124M-weight model would be 62M rows (about 0.9 KB each as Python and DuckDB rows). Here the
global top-k (or bottom-k) of a score file is found **exactly** with a streamed radix select and
written as a compact artifact, tensor by tensor:

1. keys (score or |score|, NaN = not scored, never selected) are mapped to uint32 so that
   integer order is key order (``_order_bits``), best first;
2. pass 1 counts the high 16 bits of every key, pass 2 the low 16 bits inside the bucket that
   holds the k-th key: this gives the exact k-th key T and how many keys tie with it;
3. pass 3 selects every key better than T plus the first tied ones in architecture order
   (parameter order of the score file, then lower flat index: the rule of
   :mod:`cwa.ranking`) and appends each tensor's selection to the artifact.

Memory: two 65,536-bin histograms plus temporaries of the size of the tensor being read;
nothing proportional to the whole model is held. The artifact stores per tensor either the
selected flat indices (int32/int64, 4-8 bytes per selected weight) or a packed bit mask (one
bit per weight), whichever is smaller, so it never exceeds ~4 bytes per selected weight or
1/8 byte per weight. :func:`iter_selection` streams it back, tensor by tensor.

Format: ``<path>`` is raw little-endian bytes; ``<path>.json`` lists per tensor its name,
shape, encoding (``indices``/``mask``), byte offset and length and the selected count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwa.errors import InvalidInput
from cwa.parsing import parse_percent

_BINS = 1 << 16
FORMAT = "cwa-selection/1"
SELECTION_FILE = "selection.bin"
ROWS_IN_TABLE = 10_000  # first rows of a pruning-scale ranking kept in ranked_weights for SQL


@dataclass
class SelectionSummary:
    """What a selection holds: k, the k-th key, and per-tensor counts (architecture order)."""

    k: int
    n_candidates: int
    threshold_key: float | None
    bottom: bool
    by: str
    counts: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    per: str = "global"  # comparison group (cwa.ranking_groups: tensor, row)
    group_sizes: list[list[int]] = field(default_factory=list)  # [[n_valid, n_groups], ...]


def parse_k(text: str | int, n_candidates: int) -> int:
    """``"50%"`` / ``"0.5%"`` / ``"all"`` / ``"1000"`` -> a whole k in [1, n_candidates]."""
    if isinstance(text, bool):
        raise InvalidInput(f"k {text!r} is not a number; give e.g. 1000, 10% or all")
    if isinstance(text, int):
        k = text
    else:
        value = str(text).strip().lower()
        if value == "all":
            k = n_candidates
        elif value.endswith("%"):
            percent = float(parse_percent(value))
            k = max(1, int(round(percent / 100.0 * n_candidates)))
        elif value.isdigit():
            k = int(value)
        else:
            raise InvalidInput(f"k {text!r} is not a number; give e.g. 1000, 10% or all")
    if k < 1:
        raise InvalidInput(f"k must be at least 1, got {k}")
    if k > n_candidates:
        raise InvalidInput(
            f"k = {k} is more than the {n_candidates} scored weights; lower it or use 'all'"
        )
    return k


def _order_bits(scores: np.ndarray, by: str, bottom: bool) -> np.ndarray:
    """uint32 codes: smaller code = better key (higher first, or lower with ``bottom``).

    NaN (not scored) maps to 0xFFFFFFFF and is excluded by the caller.
    """
    key = np.abs(scores) if by == "abs" else scores
    key = key.astype(np.float32, copy=True)
    key += np.float32(0.0)  # -0.0 -> +0.0: equal keys get equal codes
    bits = key.view(np.uint32)
    negative = (bits >> 31).astype(bool)
    # IEEE floats: flip all bits of negatives, set the sign bit of positives -> ascending codes.
    codes = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    if not bottom:
        codes = ~codes
    codes[np.isnan(key)] = np.uint32(0xFFFFFFFF)
    return codes


def _from_code(code: int, bottom: bool) -> float:
    c = np.uint32(code)
    if not bottom:
        c = ~c
    bits = np.uint32(c & np.uint32(0x7FFFFFFF)) if c & np.uint32(0x80000000) else ~c
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


SLICE = 1 << 22  # elements per slice of a large tensor (a multiple of 8, for packed masks)


def _tensors(path: Path, names: Sequence[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    from cwa.scorefile import open_scores

    with open_scores(path) as reader:
        for name in names if names is not None else reader.names():
            yield name, reader.get(name).float().numpy().reshape(-1)


def _slices(values: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, slice) pieces of a flat tensor: temporaries stay O(SLICE), not O(tensor)."""
    for start in range(0, values.size, SLICE):
        yield start, values[start : start + SLICE]


def radix_threshold(
    pieces: Callable[[], Iterable[np.ndarray]], k: str | int
) -> tuple[int, np.uint32, int, int]:
    """The k-th smallest code of the codes ``pieces()`` yields (called twice: two passes).

    Returns (candidates, k-th code T, how many codes equal to T belong to the first k, k);
    NaN codes (0xFFFFFFFF) are not candidates. ``k`` is parsed against the candidates.
    """
    hist_hi = np.zeros(_BINS, dtype=np.int64)
    for codes in pieces():
        codes = codes[codes != np.uint32(0xFFFFFFFF)]  # NaN: not scored, never a candidate
        hist_hi += np.bincount(codes >> 16, minlength=_BINS)
        del codes
    n_candidates = int(hist_hi.sum())
    k = parse_k(k, n_candidates)
    cum = np.cumsum(hist_hi)
    hi = int(np.searchsorted(cum, k))  # first bucket where the running count reaches k
    below = int(cum[hi - 1]) if hi else 0
    hist_lo = np.zeros(_BINS, dtype=np.int64)
    for codes in pieces():
        inside = codes[(codes >> 16) == hi]
        inside = inside[inside != np.uint32(0xFFFFFFFF)]
        hist_lo += np.bincount(inside & np.uint32(0xFFFF), minlength=_BINS)
    cum_lo = below + np.cumsum(hist_lo)
    lo = int(np.searchsorted(cum_lo, k))
    ties_left = k - (int(cum_lo[lo - 1]) if lo else below)
    return n_candidates, np.uint32((hi << 16) | lo), ties_left, k


def select_k(
    score_path: str | Path,
    k: str | int,
    out_path: str | Path,
    *,
    by: str = "value",
    bottom: bool = False,
    names: Sequence[str] | None = None,
) -> SelectionSummary:
    """Write the exact global top-k (bottom-k) of ``score_path`` to ``out_path`` (see module doc).

    ``names``: the tensors to consider, in ranking order (default: every tensor of the file).
    """
    if by not in ("value", "abs"):
        raise InvalidInput(f"by={by!r}: rank by 'value' or 'abs'")
    score_path, out_path = Path(score_path), Path(out_path)

    def pieces() -> Iterator[np.ndarray]:
        for _, scores in _tensors(score_path, names):
            for _, piece in _slices(scores):
                yield _order_bits(piece, by, bottom)

    n_candidates, threshold, ties_left, k = radix_threshold(pieces, k)
    summary = SelectionSummary(k, n_candidates, _from_code(int(threshold), bottom), bottom, by)
    entries: list[dict[str, Any]] = []
    offset = 0
    with out_path.open("wb") as out:
        for name, scores in _tensors(score_path, names):
            chosen = np.empty(scores.size, dtype=bool)
            for start, piece in _slices(scores):
                codes = _order_bits(piece, by, bottom)
                part = chosen[start : start + piece.size]
                np.less(codes, threshold, out=part)
                if ties_left > 0:  # slices run in flat-index order: lower indices win ties
                    tied = np.flatnonzero(codes == threshold)[:ties_left]
                    part[tied] = True
                    ties_left -= int(tied.size)
                del codes
            count = int(chosen.sum())
            data, encoding = _encode(chosen, count)
            out.write(data)
            entries.append(
                {"name": name, "numel": int(scores.size), "encoding": encoding,
                 "offset": offset, "length": len(data), "count": count}
            )  # fmt: skip
            summary.counts[name] = count
            offset += len(data)
    summary.bytes_written = offset
    header = {"format": FORMAT, "k": k, "by": by, "bottom": bottom,
              "threshold_key": summary.threshold_key, "tensors": entries}  # fmt: skip
    Path(f"{out_path}.json").write_text(json.dumps(header))
    return summary


def _encode(chosen: np.ndarray, count: int) -> tuple[bytes, str]:
    n = chosen.size
    index_dtype = np.int32 if n < 2**31 else np.int64
    if count * np.dtype(index_dtype).itemsize <= (n + 7) // 8:
        encoding = f"indices:{np.dtype(index_dtype).name}"
        return np.flatnonzero(chosen).astype(index_dtype).tobytes(), encoding
    return np.packbits(chosen).tobytes(), "mask"


def iter_selection(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(tensor name, selected flat indices, ascending) for every tensor, streamed from disk."""
    path = Path(path)
    header = json.loads(Path(f"{path}.json").read_text())
    if header.get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a cwa selection ({FORMAT}); re-run the ranking")
    with path.open("rb") as f:
        for entry in header["tensors"]:
            f.seek(entry["offset"])
            raw = f.read(entry["length"])
            if entry["encoding"] == "mask":
                bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=entry["numel"])
                yield entry["name"], np.flatnonzero(bits)
            else:
                dtype = np.dtype(entry["encoding"].split(":", 1)[1])
                yield entry["name"], np.frombuffer(raw, dtype=dtype).astype(np.int64)


def check_fraction_rank(config: Any) -> None:
    """``cwa rank --topk N%``: ``--mode global``; the comparison group is ``--per``."""
    text = str(config.topk).strip()
    try:
        percent = float(text[:-1])
    except ValueError as exc:
        raise InvalidInput(f"--topk {text!r} is not a percentage; write e.g. 50%") from exc
    if not 0 < percent <= 100:
        raise InvalidInput(f"--topk {text!r} must be a percentage in (0, 100]")
    if config.mode != "global":
        raise InvalidInput(
            f"--topk {text} selects a fraction of every scored weight in scope: use --mode "
            "global (--per tensor|row for a fraction of each tensor or output row)"
        )


def fraction_scope(arch: Any, header: Any, layers: Any, components: Any) -> list[str] | None:
    """Tensors a ``--topk N%`` ranking covers, in score-file order (None: every scored tensor).

    The compact artifact selects whole tensors, so a ``--layers/--components`` scope must not
    cut a fused tensor (e.g. GPT-2 ``c_attn`` for ``attn_q`` alone): refused with the fix.
    """
    if not layers and not components:
        return None
    chosen = set(arch.select(layers=layers, components=components))
    names = [name for name in header if name in chosen]
    for name in names:
        if arch.scope_mask(name, layers=layers, components=components) is not None:
            raise InvalidInput(
                f"--topk N% with --components {','.join(components or [])} would select part "
                f"of the fused tensor {name!r}; list all of its components or rank by number"
            )
    return names


def store_selection(
    ctx: Any,
    score_path: Path,
    k: int,
    *,
    by: str,
    bottom: bool,
    names: Sequence[str] | None = None,
    per: str = "global",
    axes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Write a rank run's compact selection artifact; returns metrics, records the config.

    ``per`` tensor/row: ``k`` is a fraction of each group (:mod:`cwa.ranking_groups`).
    """
    out = ctx.artifact_path(SELECTION_FILE, kind="selection")
    ctx.artifact_path(f"{SELECTION_FILE}.json", kind="selection")
    extra: dict[str, Any] = {"per": per}
    if per == "global":
        summary = select_k(score_path, k, out, by=by, bottom=bottom, names=names)
        rows = min(summary.k, ROWS_IN_TABLE)
    else:
        from cwa.ranking_groups import select_grouped

        summary = select_grouped(
            score_path, str(k), out, per=per, by=by, bottom=bottom, names=names, axes=axes
        )
        extra.update(percent=str(k), group_sizes=summary.group_sizes)
        rows = f"best {max(1, ROWS_IN_TABLE // max(1, len(summary.counts)))} per tensor"
    ctx.record_config(
        selection={
            "artifact": SELECTION_FILE,
            "format": FORMAT,
            "k": summary.k,
            "n_candidates": summary.n_candidates,
            "threshold_key": summary.threshold_key,
            "rows_in_ranked_weights": rows,
            "per_tensor": summary.counts,
            **extra,
        }
    )
    return {"n_selected": float(summary.k), "selection_bytes": float(summary.bytes_written)}
