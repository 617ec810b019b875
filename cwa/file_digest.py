"""The sha256 of a file's bytes, read in 1 MiB chunks: one function for artifact listings,
export verification and MLflow dataset digests, so they always agree on what a file's hash is."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at ``path`` (read in chunks, never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
