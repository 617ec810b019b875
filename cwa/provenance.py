"""Provenance recorded on every run: library versions, git sha, host, process."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

TRACKED_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "datasets",
    "duckdb",
    "polars",
    "safetensors",
    "mlflow",
    "scikit-learn",
    "numpy",
)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results (read without importing them)."""
    from cwa import __version__

    versions = {"python": platform.python_version(), "cwa": __version__}
    for dist in TRACKED_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the cwa source tree in use, with ``-dirty`` when it has local changes."""
    source = Path(__file__).resolve().parents[1]
    if not (source / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None
