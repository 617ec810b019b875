"""Fingerprints that scale: hash a model's weights once per state of its weight files.

:func:`cwa.models.fingerprint.model_fingerprint` hashes every weight's bytes (16 GB for an 8B
bf16 model), and every stage loads the model again. A model *loaded from files* is fully
determined by those files, the dtype it was loaded in and its config, so its fingerprint is
cached under a key made of:

* for each weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``): its resolved path,
  size, modification time (ns) and, for safetensors, the sha256 of its JSON header (names,
  dtypes, shapes, offsets -- cheap to read, and it changes when the tensors are re-laid out);
* the canonical config (as fingerprinted), and every parameter's name, dtype and shape.

The cached value is the content fingerprint itself, so a cache hit and a fresh hash agree and
stored evaluations keep matching. Any change of size/mtime/header (a rewrite, ``touch``) misses
the cache and hashes again. Models without files -- built in memory, or changed in memory
(perturbed) -- are always fingerprinted by content: pass ``files=None``. Only pass files right
after loading the model from them.

The cache is one JSON file, ``<cache>/fingerprints.json`` (``CWA_CACHE``, else
``~/.cache/cwa``), replaced atomically; ``CWA_FINGERPRINT_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cwa.progress import Reporter

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CACHE_FILE = "fingerprints.json"
_MAX_ENTRIES = 512


def cache_path() -> Path:
    root = os.environ.get("CWA_CACHE") or Path.home() / ".cache" / "cwa"
    return Path(root) / CACHE_FILE


def weight_files(location: str | Path | None) -> list[Path] | None:
    """The weight files of a model folder (or a single weight file); None when there are none."""
    if location is None:
        return None
    path = Path(location)
    if path.is_file():
        return [path] if path.suffix in WEIGHT_SUFFIXES else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files or None


def _safetensors_header_digest(path: Path) -> str:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return ""
        (length,) = struct.unpack("<Q", raw)
        return hashlib.sha256(f.read(min(length, 100 << 20))).hexdigest()


def file_key(files: Iterable[Path], model: Any) -> str:
    """The cache key of a model loaded from ``files`` (no weight bytes are read)."""
    from cwa.models.fingerprint import canonical_config_json

    digest = hashlib.sha256(b"cwa-fingerprint-cache-v1\0")
    for path in files:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        header = _safetensors_header_digest(resolved) if resolved.suffix == ".safetensors" else ""
        digest.update(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{header}\0".encode())
    digest.update(canonical_config_json(model).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"\0{name}\0{param.dtype}\0{tuple(param.shape)}".encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def cached_model_fingerprint(
    model: Any, files: list[Path] | None, *, reporter: Reporter | None = None
) -> str:
    """The content fingerprint of ``model``, from the cache when ``files`` are unchanged."""
    from cwa.models.fingerprint import model_fingerprint

    enabled = os.environ.get("CWA_FINGERPRINT_CACHE", "1").strip().lower() not in ("0", "false")
    if not files or not enabled:
        return model_fingerprint(model, reporter=reporter)
    key = file_key(files, model)
    path = cache_path()
    entries = _read_cache(path)
    hit = entries.get(key)
    if isinstance(hit, str) and len(hit) == 64:
        return hit
    fingerprint = model_fingerprint(model, reporter=reporter)
    entries = _read_cache(path)  # another process may have added entries meanwhile
    entries[key] = fingerprint
    if len(entries) > _MAX_ENTRIES:  # keep the newest (dicts keep insertion order)
        entries = dict(list(entries.items())[-_MAX_ENTRIES:])
    _write_cache(path, entries)
    return fingerprint
