"""Typed errors raised by the cwa library.

The library never prints or exits; every failure a user can act on is one of these,
carrying a one-line message that names the problem and the fix. The CLI turns them
into ``Error: <message>`` on stderr and exit code 1.
"""

from __future__ import annotations


class CwaError(Exception):
    """Base class of every error cwa raises on purpose."""

    exit_code: int = 1


class InvalidInput(CwaError):
    """A user-supplied value (option, file, query) is wrong."""


class UsageError(InvalidInput):
    """Options that contradict each other or are missing (exit code 2)."""

    exit_code = 2


class RunNotFound(CwaError):
    """No run matches the given id, prefix or ``latest`` selector."""


class AmbiguousRunId(CwaError):
    """A run id prefix matches more than one run."""


class UnknownName(CwaError):
    """A name looked up in a registry (metric, method, task, ...) does not exist."""


class UnknownComponent(UnknownName):
    """A component name is not one of the architecture map's components."""


class StoreNotFound(CwaError):
    """A read-only command was pointed at a store directory that does not exist."""


class StoreVersionError(CwaError):
    """The store's schema is newer than this cwa, or a released migration was edited."""


class MigrationError(CwaError):
    """A migration failed to apply; nothing of it was kept."""


class StoreLocked(CwaError):
    """Another process held the store's write lock for longer than the bounded wait."""


class StoreCorrupt(CwaError):
    """The store file is not a DuckDB database or cannot be read."""


class ModelLoadError(CwaError):
    """A model could not be found, downloaded or instantiated."""


class UnsupportedArchitecture(CwaError):
    """A stage cannot handle this model's architecture."""


class DataError(InvalidInput):
    """A data file or dataset spec is missing, empty or malformed."""


class NonFiniteError(CwaError):
    """A loss or score became NaN or infinite."""


class RestoreError(CwaError):
    """A perturbed tensor did not come back bit-identical after restoration."""
