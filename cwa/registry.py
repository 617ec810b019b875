"""One generic registry for pluggable components (metrics, methods, selections, tasks, analyzers).

Components register with a decorator, optionally under aliases. An entry may also be a lazy
``"module:attr"`` placeholder so that listing or choosing one component never imports the
others. Unknown names raise :class:`~cwa.errors.UnknownName` with close matches and the full
list of available names. User plugins are added with :meth:`Registry.load_plugin` (a
``module:attr`` spec) or through the ``cwa.<kind>`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cwa.errors import InvalidInput, UnknownName

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    name: str
    description: str
    target: T | str  # the object, or a lazy "module:attr" placeholder


def import_object(spec: str) -> object:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"plugin spec {spec!r} is not of the form 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"cannot import plugin module {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise InvalidInput(f"plugin module {module_name!r} has no attribute {attr!r}") from exc
    return obj


def plugin_attributes(obj: object, defaults: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The flags a plugin function carries as attributes (``f.takes_scale = True``), each
    falling back to ``defaults``, and its description (first line of its docstring)."""
    values = {key: getattr(obj, key, default) for key, default in defaults.items()}
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return values, doc[0] if doc else ""


class Registry(Generic[T]):
    """A named collection of components of one kind (e.g. ``metric``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, _Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = False

    # -- registration -----------------------------------------------------------------
    def register(
        self, name: str, *, aliases: tuple[str, ...] = (), description: str | None = None
    ) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (and ``aliases``)."""

        def decorate(obj: T) -> T:
            self.add(name, obj, aliases=aliases, description=description)
            return obj

        return decorate

    def add(
        self,
        name: str,
        obj: T | str,
        *,
        aliases: tuple[str, ...] = (),
        description: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register ``obj`` (or a lazy ``"module:attr"`` string) under ``name``."""
        if not replace and (name in self._entries or name in self._aliases):
            raise InvalidInput(f"{self.kind} {name!r} is already registered")
        if description is None:
            doc = getattr(obj, "__doc__", None) if not isinstance(obj, str) else None
            description = (doc or "").strip().splitlines()[0] if doc else ""
        self._entries[name] = _Entry(name, description, obj)
        for alias in aliases:
            self._aliases[alias] = name

    def load_plugin(self, spec: str, name: str | None = None) -> str:
        """Register a user component from ``module:attr``; returns the name used."""
        obj = import_object(spec)
        reg_name = name or getattr(obj, "name", None) or spec.rpartition(":")[2]
        self.add(str(reg_name), obj, replace=True)  # type: ignore[arg-type]
        return str(reg_name)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=f"cwa.{self.kind}s"):
            if ep.name not in self._entries:
                self._entries[ep.name] = _Entry(ep.name, f"plugin {ep.value}", ep.value)

    # -- lookup -----------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) for every registered component, sorted by name."""
        return [(n, self._entries[n].description) for n in self.names()]

    def canonical(self, name: str) -> str:
        self._load_entry_points()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        if ":" in name:  # a plugin spec given directly where a name is expected
            return self.load_plugin(name)
        candidates = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownName(
            f"unknown {self.kind} {name!r}{hint} available: {', '.join(self.names())}"
        )

    def get(self, name: str) -> T:
        entry = self._entries[self.canonical(name)]
        if isinstance(entry.target, str):
            entry.target = import_object(entry.target)  # type: ignore[assignment]
        return entry.target  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @contextmanager
    def isolated(self) -> Iterator[Registry[T]]:
        """Temporarily snapshot the registry; changes made inside are undone on exit (tests)."""
        saved = (dict(self._entries), dict(self._aliases), self._entry_points_loaded)
        try:
            yield self
        finally:
            self._entries, self._aliases, self._entry_points_loaded = saved
