"""Score files: per-weight scores stored as safetensors, written one tensor at a time.

A score file holds one entry per scored parameter, with the parameter's name and shape. The
writer knows every name and shape before the first score exists, so it writes the safetensors
header first and then appends each tensor's bytes as the metric produces it: at most one score
tensor is ever held by the writer, never a second full copy of all scores. The result is a plain
safetensors file that :func:`safetensors.safe_open` reads lazily, tensor by tensor.

Output is byte-identical for identical inputs: the JSON header is written in the declared order
with fixed separators and padded with spaces to an 8-byte boundary, and nothing time-dependent
goes into it.

This module imports torch only inside the functions that move tensor bytes, so reading the
header (:func:`read_score_header`) stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import DataError, InvalidInput

if TYPE_CHECKING:
    import torch

# safetensors dtype codes and their sizes in bytes, for the dtypes a score file may hold.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("F32", 4),
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float64": ("F64", 8),
}
_HEADER_ALIGNMENT = 8


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in SAFETENSORS_DTYPES:
        raise InvalidInput(
            f"score dtype {name!r} is not supported; use one of {', '.join(SAFETENSORS_DTYPES)}"
        )
    return name


def _build_header(
    entries: Sequence[tuple[str, tuple[int, ...]]], dtype: str, metadata: Mapping[str, str]
) -> tuple[bytes, list[int]]:
    """Serialize the safetensors header; returns (header bytes incl. length prefix, sizes)."""
    code, itemsize = SAFETENSORS_DTYPES[dtype]
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidInput("score file metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    sizes: list[int] = []
    offset = 0
    for name, shape in entries:
        if name == "__metadata__" or name in header:
            raise InvalidInput(f"score file entry name {name!r} is reserved or repeated")
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sizes.append(nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    # Pad with spaces so the tensor data starts on an 8-byte boundary (safetensors does the same).
    text += b" " * (-(len(text)) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, sizes


class ScoreFileWriter:
    """Streaming safetensors writer: header first, then each tensor in the declared order.

    Use as a context manager. Data goes to ``<path>.partial``, renamed to ``path`` only when
    every declared tensor was written; on an exception the partial file is removed, so a
    failed metric never leaves a truncated score file behind.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Sequence[tuple[str, Sequence[int]]],
        dtype: str | torch.dtype = "float32",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # safetensors is little-endian; we write raw memory
            raise InvalidInput("score files can only be written on little-endian machines")
        self.path = Path(path)
        self.dtype = _dtype_name(dtype)
        self._entries = [(str(n), tuple(int(d) for d in s)) for n, s in entries]
        self._header, self._sizes = _build_header(self._entries, self.dtype, metadata or {})
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._next = 0
        self._file: Any = None

    def __enter__(self) -> ScoreFileWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._partial, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(self._header)
        return self

    @property
    def pending(self) -> list[str]:
        """Names declared but not yet written, in order."""
        return [name for name, _ in self._entries[self._next :]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next declared tensor (must come in declared order, shape and dtype)."""
        import torch

        if self._file is None:
            raise InvalidInput("ScoreFileWriter.write called outside its 'with' block")
        if self._next >= len(self._entries):
            raise InvalidInput(f"score file got an undeclared extra tensor {name!r}")
        expected_name, expected_shape = self._entries[self._next]
        if name != expected_name:
            raise InvalidInput(
                f"score file expected tensor {expected_name!r} next but got {name!r}; "
                "write tensors in the declared order"
            )
        if tuple(tensor.shape) != expected_shape:
            raise InvalidInput(
                f"score tensor {name!r} has shape {tuple(tensor.shape)}, declared {expected_shape}"
            )
        if _dtype_name(tensor.dtype) != self.dtype:
            raise InvalidInput(f"score tensor {name!r} is {tensor.dtype}, declared {self.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != self._sizes[self._next]:  # pragma: no cover - guarded by shape check
            raise InvalidInput(f"score tensor {name!r} has an unexpected byte size")
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        file, self._file = self._file, None
        file.close()
        if exc_type is None and self._next != len(self._entries):
            os.unlink(self._partial)
            raise InvalidInput(
                f"score file closed with {len(self._entries) - self._next} declared tensors "
                f"unwritten (first: {self._entries[self._next][0]!r})"
            )
        if exc_type is not None:
            os.unlink(self._partial)
            return
        os.replace(self._partial, self.path)


def write_score_file(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype = "float32",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an in-memory mapping of score tensors (convenience for tests and small models)."""
    entries = [(name, tuple(t.shape)) for name, t in tensors.items()]
    with ScoreFileWriter(path, entries, dtype, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return Path(path)


def read_score_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a score file's header without torch: ({name: {dtype, shape, ...}}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"score file {str(path)!r} does not exist; run 'cwa score' first")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise DataError(f"score file {str(path)!r} is truncated; re-run the score stage")
        (size,) = struct.unpack("<Q", prefix)
        raw = handle.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"score file {str(path)!r} has a corrupt header ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


class ScoreFileReader:
    """Lazy reader over a score file (wraps ``safetensors.safe_open``); see :func:`open_scores`."""

    def __init__(self, handle: Any, path: Path) -> None:
        self._handle = handle
        self.path = path
        header, self.metadata = read_score_header(path)
        # Declared (= written) order; safe_open's keys() is sorted alphabetically instead.
        self._names = list(header)
        self._shapes = {name: tuple(info["shape"]) for name, info in header.items()}

    def names(self) -> list[str]:
        """Entry names in the order they were written."""
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def get(self, name: str) -> torch.Tensor:
        """Load one score tensor (CPU)."""
        if name not in self._shapes:
            raise InvalidInput(f"score file {str(self.path)!r} has no entry {name!r}")
        return self._handle.get_tensor(name)

    def items(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, in written order (or the order of ``names``)."""
        for name in self._names if names is None else names:
            yield name, self.get(name)


@contextmanager
def open_scores(path: str | Path) -> Iterator[ScoreFileReader]:
    """Open a score file for lazy, tensor-by-tensor reading."""
    from safetensors import safe_open

    path = Path(path)
    read_score_header(path)  # clear DataError for a missing or corrupt file
    try:
        handle_cm = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"score file {str(path)!r} cannot be read ({exc})") from exc
    with handle_cm as handle:
        yield ScoreFileReader(handle, path)


def load_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every score tensor into memory (tests and small models only)."""
    with open_scores(path) as reader:
        return dict(reader.items())
