"""Checksums of whole weight tensors, used to prove that a perturbation was undone bit for bit.

Two algorithms, named in the checksum string itself (``"<algorithm>:<hex>"``) so that a stored
value says how it was made:

``sha256``
    SHA-256 over the tensor's dtype, shape and raw bytes. Used for CPU tensors: hashlib reads
    the tensor's memory without a copy and, with the SHA CPU extensions, runs at over 1 GB/s.

``lin64``
    A keyed sum of the tensor's 64-bit words modulo 2**64, computed on the tensor's own device
    (no transfer to the host; milliseconds for a GPU-resident 7B model). Word ``w`` at column
    ``c`` of row ``r`` (rows of :data:`_ROW_WIDTH` words) contributes ``f(w ^ s_c) * m_r``, where
    ``f`` is the SplitMix64 finaliser (a bijection on 64-bit words), ``s_c`` a column salt and
    ``m_r`` an odd row multiplier. A bijection changes its output whenever its input changes, and
    ``delta * odd == 0 (mod 2**64)`` only when ``delta == 0``, so a change to any single word is
    always detected. The mixing matters: with a purely linear sum (``w * odd``), flipping the top
    bit of a word adds ``2**63`` whatever the weight, and two sign flips of float32 values would
    cancel. Several simultaneous changes cancel only with probability ~2**-64 (it is not a
    cryptographic hash: it detects accidents, not adversaries). The sum, byte length, dtype and
    shape are then folded through SHA-256 into 16 hex digits.

The default picks ``sha256`` on the CPU and ``lin64`` elsewhere. A checksum is only compared
with another of the same algorithm (:func:`same_checksum`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from cwa.errors import InvalidInput

ALGORITHMS = ("sha256", "lin64")

# Words per row of the lin64 layout and rows processed per chunk (bounds the int64 temporaries
# to _CHUNK_ROWS * _ROW_WIDTH * 8 bytes = 32 MiB whatever the tensor size).
_ROW_WIDTH = 1024
_CHUNK_ROWS = 4096

_MASK64 = (1 << 64) - 1
_column_weights_cache: dict[str, torch.Tensor] = {}


def _to_signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic, logical right shifts)."""

    def lshr(z: torch.Tensor, s: int) -> torch.Tensor:
        # int64 >> is arithmetic in torch; masking off the sign-extended bits makes it logical.
        return (z >> s) & ((1 << (64 - s)) - 1)

    z = x + _to_signed64(0x9E3779B97F4A7C15)
    z = (z ^ lshr(z, 30)) * _to_signed64(0xBF58476D1CE4E5B9)
    z = (z ^ lshr(z, 27)) * _to_signed64(0x94D049BB133111EB)
    return z ^ lshr(z, 31)


def _column_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    weights = _column_weights_cache.get(key)
    if weights is None:
        cols = torch.arange(_ROW_WIDTH, dtype=torch.int64, device=device)
        weights = _splitmix64(cols + 0x5EED)  # column salts
        _column_weights_cache[key] = weights
    return weights


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (no copy for contiguous tensors)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return flat.view(torch.uint8)


def _lin64_sum(tensor: torch.Tensor) -> int:
    data = _byte_view(tensor)
    n_bytes = data.numel()
    n_words = n_bytes // 8
    tail = data[n_words * 8 :]
    words = data[: n_words * 8].view(torch.int64)
    n_full_rows = n_words // _ROW_WIDTH
    col_w = _column_weights(tensor.device)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for row_start in range(0, n_full_rows, _CHUNK_ROWS):
        row_stop = min(row_start + _CHUNK_ROWS, n_full_rows)
        rows = words[row_start * _ROW_WIDTH : row_stop * _ROW_WIDTH].view(-1, _ROW_WIDTH)
        row_ids = torch.arange(row_start, row_stop, dtype=torch.int64, device=tensor.device)
        row_w = _splitmix64(row_ids) | 1
        total += (_splitmix64(rows ^ col_w).sum(dim=1) * row_w).sum()
    # The last partial row and the trailing bytes (numel * itemsize not a multiple of 8) are
    # zero-padded into one more row; the byte length folded in below keeps padding unambiguous.
    rest_words = words[n_full_rows * _ROW_WIDTH :]
    if rest_words.numel() or tail.numel():
        last = torch.zeros(_ROW_WIDTH * 8, dtype=torch.uint8, device=tensor.device)
        n_rest = rest_words.numel() * 8
        last[:n_rest] = rest_words.view(torch.uint8)
        last[n_rest : n_rest + tail.numel()] = tail
        row_w = _splitmix64(torch.tensor(n_full_rows, dtype=torch.int64, device=tensor.device))
        n_last = (n_rest + tail.numel() + 7) // 8  # only real words are mixed, not padding
        mixed = _splitmix64(last.view(torch.int64)[:n_last] ^ col_w[:n_last])
        total += mixed.sum() * (row_w | 1)
    return int(total.item()) & _MASK64


def _header(tensor: torch.Tensor) -> bytes:
    return f"{tensor.dtype}|{tuple(tensor.shape)}|".encode()


def default_algorithm(tensor: torch.Tensor) -> str:
    """``sha256`` for CPU tensors, ``lin64`` for tensors on an accelerator."""
    return "sha256" if tensor.device.type == "cpu" else "lin64"


def tensor_checksum(tensor: torch.Tensor, algorithm: str | None = None) -> str:
    """Checksum of a tensor's dtype, shape and every byte, as ``"<algorithm>:<hex>"``.

    Non-contiguous tensors are hashed in logical (row-major) order through a temporary copy.
    """
    algorithm = algorithm or default_algorithm(tensor)
    if algorithm not in ALGORITHMS:
        raise InvalidInput(
            f"unknown checksum algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if algorithm == "sha256":
        hasher = hashlib.sha256(_header(tensor))
        data = _byte_view(tensor)
        if data.device.type != "cpu":
            data = data.cpu()
        hasher.update(memoryview(data.numpy()))
        return f"sha256:{hasher.hexdigest()}"
    total = _lin64_sum(tensor)
    n_bytes = tensor.numel() * tensor.element_size()
    folded = hashlib.sha256(_header(tensor) + f"{n_bytes}|".encode() + total.to_bytes(8, "little"))
    return f"lin64:{folded.hexdigest()[:16]}"


def same_checksum(a: str, b: str) -> bool:
    """True when two checksums are equal; raises if they were made by different algorithms."""
    alg_a, alg_b = a.partition(":")[0], b.partition(":")[0]
    if alg_a != alg_b:
        raise InvalidInput(
            f"cannot compare a {alg_a} checksum with a {alg_b} one; recompute both on one device"
        )
    return a == b


def combine_checksums(checksums: Mapping[str, str]) -> str:
    """One checksum for a set of named tensors (order-independent: names are sorted)."""
    hasher = hashlib.sha256()
    for name in sorted(checksums):
        hasher.update(f"{name}={checksums[name]}\n".encode())
    return f"set:{hasher.hexdigest()[:32]}"


def named_checksums(
    named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    algorithm: str | None = None,
) -> dict[str, str]:
    """``{name: tensor_checksum(tensor)}`` for every named tensor (e.g. a sweep's baseline)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return {name: tensor_checksum(t, algorithm) for name, t in items}
