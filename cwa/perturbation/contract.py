"""The selection contract: how a selection (the treatment or a control) plugs into ``cwa perturb``.

Every selection is a :class:`SelectionSpec` registered in :data:`cwa.perturbation.SELECTIONS`
(built-ins: ``top_k``, ``random_k``, ``bottom_k``, ``all_k``; plugins: a ``module:attr`` spec or
the ``cwa.selections`` entry-point group). The perturb stage never names a selection: it looks
the spec up and calls it, so a new selection is one spec and nothing else.

Names and parameters
    ``--controls`` / ``--treatment`` take ``NAME`` or ``NAME:PARAM``. When ``NAME`` is a
    registered selection the text after the first ``:`` is its parameter (e.g. ``cluster:3``);
    otherwise the whole text is a ``module:attr`` plugin spec. A spec with
    ``takes_param=False`` refuses a parameter, one with ``requires_param=True`` refuses its
    absence (:func:`parse_selection`).

Two phases, matching the stage protocol (validate -> register -> compute -> write)
    ``check(SelectionCheck)`` runs **before the run is registered**, with read access to the
    store and the rank/score runs: look up what the parameter refers to (an analyze run, a
    cluster id) and raise :class:`~cwa.errors.InvalidInput` when it is wrong. It returns
    extra parent runs as ``[(run_id, role)]`` (e.g. the analyze run a cluster comes from), which
    the stage records as lineage.

    ``build(SelectionRequest) -> Selection`` runs while computing, once per condition, with the
    loaded model, its architecture map, the experiment's scope, the scope of every group of the
    rank mode, the treatment (for controls) and its per-group counts, the seed, the ranking key
    and a lazy reader of the score file. It returns a
    :class:`~cwa.perturbation.selection.Selection` (parameter name -> sorted flat indices).

Matching
    ``role="treatment"`` specs make the selection the controls are compared with (``top_k``;
    the analyze stage's ``cluster:ID``). ``role="control"`` specs with ``matched=True`` must
    return, for every group label in ``request.counts``, exactly that many weights drawn from
    ``request.groups[label]`` (the elements that group ranked: head elements in head mode, the
    masked part of fused tensors); :func:`cwa.perturbation.groups.count_by_group` is how the
    stage checks and stores it (table ``condition_groups``). ``matched=False`` (``all_k``) is an
    upper bound, not a matched control.

Flags the stage reads instead of hard-coded names
    ``stochastic`` (one condition per ``--seeds`` seed), ``depends_on_k`` (False: once per scale,
    not once per k), ``takes_param``/``requires_param``.

A plain function ``f(request) -> Selection`` given as a plugin is wrapped as a matched,
stochastic control (:func:`as_selection_spec`); its attributes ``role``, ``matched``,
``stochastic``, ``depends_on_k``, ``takes_param``, ``check`` override those defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cwa.errors import InvalidInput

Role = Literal["treatment", "control"]
RankingKey = Literal["abs", "value"]


@dataclass
class SelectionCheck:
    """What ``SelectionSpec.check`` sees before the run is registered (read-only)."""

    name: str
    param: str | None
    store: Any  # cwa.store.Store; read with ``store.read()``
    rank_run: Any  # cwa.store.runs.RunRecord
    score_run: Any  # cwa.store.runs.RunRecord
    config: Any  # the stage's PerturbConfig


@dataclass
class SelectionRequest:
    """What ``SelectionSpec.build`` gets while the run computes (one condition)."""

    name: str
    param: str | None
    k: int  # the condition's k (treatment size in global mode)
    seed: int | None
    key: RankingKey  # "abs": rank/compare |score|; "value": the raw score
    scope: Sequence[Any]  # list[ScopeEntry]: everything the ranking covered
    groups: Mapping[str, Sequence[Any]]  # group label -> list[ScopeEntry] of that group
    counts: Mapping[str, int] | None  # treatment weights per group (None for the treatment)
    treatment: Any | None  # the treatment Selection (None when building the treatment)
    ranking: Any  # polars frame: group_key, rank, parameter, flat_index (in scope, best first)
    scores: Callable[[Sequence[Any]], Iterator[tuple[str, Any]]]  # entries -> (name, scores)
    model: Any  # the loaded torch model (do not modify; the stage perturbs and restores)
    arch: Any  # cwa.models.architecture.ArchitectureMap
    store: Any
    rank_run: Any
    score_run: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectionSpec:
    """A registered selection: its flags and its two functions (see the module docstring)."""

    name: str
    description: str
    build: Callable[[SelectionRequest], Any]
    role: Role = "control"
    matched: bool = True
    stochastic: bool = False
    depends_on_k: bool = True
    takes_param: bool = False
    requires_param: bool = False
    check: Callable[[SelectionCheck], list[tuple[str, str]] | None] | None = None


def as_selection_spec(obj: Any, name: str) -> SelectionSpec:
    """A SelectionSpec as is, or a plugin function ``f(request) -> Selection`` wrapped."""
    if isinstance(obj, SelectionSpec):
        return obj
    if not callable(obj):
        raise InvalidInput(
            f"selection {name!r} is neither a SelectionSpec nor a function f(request); "
            "see cwa.perturbation.contract"
        )
    from cwa.registry import plugin_attributes

    flags, description = plugin_attributes(obj, _PLUGIN_FLAGS)
    role, check = flags.pop("role"), flags.pop("check")
    if role not in ("treatment", "control"):
        raise InvalidInput(f"selection {name!r} has role {role!r}; use 'treatment' or 'control'")
    return SelectionSpec(
        name=str(getattr(obj, "name", name)),
        description=description,
        build=obj,
        role=role,
        check=check,
        **{key: bool(value) for key, value in flags.items()},
    )


_PLUGIN_FLAGS: dict[str, Any] = {
    "role": "control",
    "matched": True,
    "stochastic": True,
    "depends_on_k": True,
    "takes_param": False,
    "requires_param": False,
    "check": None,
}


@dataclass(frozen=True)
class ParsedSelection:
    """A ``--controls``/``--treatment`` item resolved against the registry."""

    name: str  # canonical registered name
    param: str | None
    spec: SelectionSpec

    @property
    def label(self) -> str:
        """What the condition and the ``selection`` column show: ``name`` or ``name:param``."""
        return self.name if self.param is None else f"{self.name}:{self.param}"


def parse_selection(text: str) -> ParsedSelection:
    """Resolve ``NAME``, ``NAME:PARAM`` or a ``module:attr`` plugin spec to its spec.

    Raises UnknownName / InvalidInput with the fix when the name or the parameter is wrong.
    """
    from cwa.perturbation import SELECTIONS

    text = text.strip()
    head, sep, tail = text.partition(":")
    if sep and head in SELECTIONS:
        name, param = SELECTIONS.canonical(head), tail
    else:
        name, param = SELECTIONS.canonical(text), None
    spec = as_selection_spec(SELECTIONS.get(name), name)
    if param is not None and not spec.takes_param:
        raise InvalidInput(f"selection {name!r} takes no parameter, got {text!r}; write {name!r}")
    if param is not None and not param:
        raise InvalidInput(f"selection {text!r} has an empty parameter; write {name}:VALUE")
    if param is None and spec.requires_param:
        raise InvalidInput(f"selection {name!r} needs a parameter; write {name}:VALUE")
    return ParsedSelection(name, param, spec)
