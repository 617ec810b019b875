"""Sweeps that reuse work: the hidden states below layer L, computed once, replayed per condition.

A perturbation sweep evaluates the same requests once per condition with only some weights
changed. When a condition touches only decoder layers >= L, everything the model computes up
to the input of layer L (embeddings, position handling, layers 0..L-1) is bit-identical to
what any other such condition computes, so it is computed once:

* **capture**: during the first eligible condition's own evaluation, a forward hook on layer
  L-1 records its output for every forward call of the decoder stack, in call order, together
  with the call's identity (``input_ids``, ``attention_mask``, ``position_ids`` and the
  length of a KV cache passed in, kept as exact copies; they are small next to the states);
* **replay**: for the next eligible conditions, layers 0..L-1 of the decoder's ``ModuleList``
  are swapped for stand-ins that return the recorded output in the structure the real layer
  returned. The model still computes its masks, positions and rotary embeddings itself, and
  layers >= L, the final norm and the head run for real, so the numbers are those of a full
  forward (the same kernels on the same inputs: tests compare with ``torch.equal``).

Every replayed call is checked against its recorded identity; a call that does not match runs
the real layers (a *fallback*, counted), and a call that cannot fall back safely (it continues
a KV cache that a replayed call filled) raises :class:`LayerReuseMismatch` rather than
compute something wrong.

The shared-context path (:mod:`cwa.evaluation.prefix_cache`: a batch's contexts and endings
packed into one pass with a 4-D mask) replays like any other call; the mask is part of the
recorded identity. For callers that do continue a KV cache, a skipped layer's stand-in appends
a placeholder of the right length to its own cache layer (one element per position), so the
cache length transformers derives from layer 0, the masks and the cache's batch selection are
exactly as in a full forward; only layers >= L ever read their cache entries, and those are
real.

States are kept on layer L's device (a device map's layer L). Their total size is bounded by a
budget: a capture that would exceed it is dropped and the sweep evaluates every condition in
full (the reason is reported and recorded), so a large evaluation set never exhausts memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwa.errors import CwaError
from cwa.evaluation.reuse_plan import ReusePlan, decoder_stack, lowest_layer, plan_reuse
from cwa.progress import NULL_REPORTER, Reporter

DEFAULT_BUDGET_BYTES = 4 << 30


class LayerReuseMismatch(CwaError):
    """A replayed forward call does not match the recorded one and cannot fall back."""


def _tensor_key(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.device == b.device
            and torch.equal(a, b)
        )
    return a == b


def _find_cache(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


@dataclass
class _Entry:
    key: tuple[Any, ...]
    state: torch.Tensor
    tuple_len: int | None  # None: the layer returned a tensor; n: a tuple (state, None, ...)


@dataclass
class ReuseStats:
    from_layer: int | None
    reason: str
    budget_bytes: int
    state_bytes: int = 0
    captured_calls: int = 0
    replayed_calls: int = 0
    fallback_calls: int = 0
    conditions_captured: int = 0
    conditions_replayed: int = 0
    conditions_full: int = 0
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "from_layer": self.from_layer,
            "reason": self.reason,
            "budget_bytes": self.budget_bytes,
            "state_bytes": self.state_bytes,
            "conditions_captured": self.conditions_captured,
            "conditions_replayed": self.conditions_replayed,
            "conditions_full": self.conditions_full,
            "captured_calls": self.captured_calls,
            "replayed_calls": self.replayed_calls,
            "fallback_calls": self.fallback_calls,
            "notes": list(self.notes),
        }


class _StandIn(nn.Module):
    """Takes the place of skipped layer ``index`` during a replay (no parameters)."""

    def __init__(self, index: int, real: nn.Module, session: LayerReuse) -> None:
        super().__init__()
        # Plain attributes, not submodules: the stand-in must not own the real layer's weights.
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_session", session)
        self.index = index

    def __getattr__(self, name: str) -> Any:
        # Model code may read layer attributes (e.g. ``attention_type``): the real layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        session: LayerReuse = self._session
        entry = session._active
        if entry is None:  # this call did not match its record: run the real layer
            return self._real(*args, **kwargs)
        state = entry.state
        cache = _find_cache(args, kwargs)
        if cache is not None:
            # A placeholder of the call's length keeps this layer's cache as long as the real
            # one (layer 0's length gives the masks' past length); no layer reads it.
            batch, length = int(state.shape[0]), int(state.shape[1])
            dummy = state.new_zeros((batch, 1, length, 1))
            cache.update(dummy, dummy, self.index)
            cache._cwa_layer_reuse = True
        if self.index == session.from_layer - 1:
            state = state.clone()  # layer L may work in place on its input
        return state if entry.tuple_len is None else (state, *([None] * (entry.tuple_len - 1)))


class LayerReuse:
    """Capture once, replay for every eligible condition (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        arch: Any,
        plan: ReusePlan,
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        reporter: Reporter | None = None,
    ) -> None:
        self.reporter = reporter or NULL_REPORTER
        self.from_layer = plan.from_layer
        self.stats = ReuseStats(plan.from_layer, plan.reason, int(budget_bytes))
        self.budget_bytes = int(budget_bytes)
        self.arch = arch
        self.entries: list[_Entry] = []
        self.status = "pending" if plan.from_layer is not None else "off"
        self._active: _Entry | None = None
        self._pending_key: tuple[Any, ...] | None = None
        self._cursor = 0
        stack = decoder_stack(model, arch) if plan.from_layer is not None else None
        if stack is None:
            self.status = "off"
            self.owner = self.layers = None
        else:
            self.owner, self.layers = stack

    # -- what a condition does ---------------------------------------------------------
    @contextmanager
    def condition(self, touched: Sequence[str]) -> Iterator[str]:
        """Around one condition's evaluation; yields ``"capture"``, ``"replay"`` or ``"full"``.

        ``touched``: the names of the parameters the condition perturbs.
        """
        eligible = self.status in ("pending", "captured") and (
            lowest_layer(list(touched), self.arch) >= int(self.from_layer or 0)
        )
        if not eligible:
            self.stats.conditions_full += 1
            yield "full"
        elif self.status == "pending":
            with self._capturing():
                yield "capture"
            if self.status == "pending":  # not dropped on the way
                self.status = "captured"
                self.stats.conditions_captured += 1
            else:
                self.stats.conditions_full += 1
        else:
            with self._replaying():
                yield "replay"
            self.stats.conditions_replayed += 1

    def record(self) -> dict[str, Any]:
        """What the sweep reused, for the run's config."""
        return self.stats.record()

    def release(self) -> None:
        """Free the captured states."""
        self.entries = []

    # -- identity of a forward call of the stack ------------------------------------------
    def _call_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None:
            return None
        cache = _find_cache(args, kwargs)
        past = None if cache is None else int(cache.get_seq_length())
        return (
            _tensor_key(input_ids),
            _tensor_key(kwargs.get("attention_mask")),
            _tensor_key(kwargs.get("position_ids")),
            past,
        )

    def _drop(self, reason: str) -> None:
        self.entries = []
        self.stats.state_bytes = 0
        self.status = "off"
        self.stats.reason = reason
        self.stats.notes.append(reason)
        self.reporter.warn(f"layer reuse off: {reason}; every condition is evaluated in full")

    # -- capture -------------------------------------------------------------------------
    @contextmanager
    def _capturing(self) -> Iterator[None]:
        assert self.owner is not None and self.layers is not None and self.from_layer
        last = self.layers[self.from_layer - 1]
        # Layer L's device (none past the last layer: the final norm reads the state in place).
        target = self.layers[self.from_layer] if self.from_layer < len(self.layers) else None
        target_device = (
            next((p.device for p in target.parameters() if p.device.type != "meta"), None)
            if target is not None
            else None
        )

        def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.status != "pending":
                return
            if self._pending_key is not None:
                self._drop("a forward call of the decoder did not reach layer L-1")
                return
            key = self._call_key(args, kwargs)
            if key is None:
                self._drop("a forward call without input_ids cannot be identified")
                return
            self._pending_key = key

        def record(_module: Any, _args: Any, output: Any) -> None:
            if self.status != "pending":
                return
            key, self._pending_key = self._pending_key, None
            tuple_len = None
            state = output
            if isinstance(output, tuple):
                if not output or any(x is not None for x in output[1:]):
                    self._drop("the decoder layer returns more than its hidden states")
                    return
                state, tuple_len = output[0], len(output)
            if key is None or not isinstance(state, torch.Tensor):
                self._drop("a decoder layer ran outside a forward call of its stack")
                return
            state = state.detach()
            state = state.to(target_device) if target_device is not None else state
            state = state.clone()
            size = state.numel() * state.element_size()
            if self.stats.state_bytes + size > self.budget_bytes:
                self._drop(
                    f"the states below layer {self.from_layer} need more than the "
                    f"{self.budget_bytes / 2**30:.2f} GiB budget (--layer-reuse-budget)"
                )
                return
            self.entries.append(_Entry(key, state, tuple_len))
            self.stats.state_bytes += size
            self.stats.captured_calls += 1

        handles = [
            self.owner.register_forward_pre_hook(before, with_kwargs=True),
            last.register_forward_hook(record),
        ]
        try:
            yield
        except BaseException:
            self.entries, self.status = [], "off"  # a partial capture is never replayed
            raise
        finally:
            for handle in handles:
                handle.remove()
            self._pending_key = None
        if self.status == "pending" and not self.entries:
            self._drop("the condition's evaluation made no forward call to capture")

    # -- replay --------------------------------------------------------------------------
    @contextmanager
    def _replaying(self) -> Iterator[None]:
        assert self.owner is not None and self.layers is not None and self.from_layer
        layers = self.layers
        real = [layers[i] for i in range(self.from_layer)]
        self._cursor = 0

        def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            index, self._cursor = self._cursor, self._cursor + 1
            key = self._call_key(args, kwargs)
            entry = self.entries[index] if index < len(self.entries) else None
            if (
                entry is not None
                and key is not None
                and len(key) == len(entry.key)
                and all(_same(a, b) for a, b in zip(key, entry.key, strict=True))
            ):
                self._active = entry
                self.stats.replayed_calls += 1
                return
            self._active = None
            cache = _find_cache(args, kwargs)
            if cache is not None and getattr(cache, "_cwa_layer_reuse", False):
                raise LayerReuseMismatch(
                    f"forward call {index} under layer reuse does not match the captured "
                    "call and continues a replayed KV cache; rerun with --no-layer-reuse"
                )
            self.stats.fallback_calls += 1
            note = f"forward call {index} did not match its capture: computed in full"
            if note not in self.stats.notes and len(self.stats.notes) < 5:
                self.stats.notes.append(note)

        def after(_module: Any, _args: Any, _output: Any) -> None:
            self._active = None

        handles = [
            self.owner.register_forward_pre_hook(before, with_kwargs=True),
            self.owner.register_forward_hook(after),
        ]
        try:
            for i, layer in enumerate(real):
                layers[i] = _StandIn(i, layer, self)
            yield
        finally:
            for i, layer in enumerate(real):
                layers[i] = layer
            for handle in handles:
                handle.remove()
            self._active = None


def sweep_reuse(
    model: Any,
    arch: Any,
    scope_names: Sequence[str],
    n_conditions: int,
    *,
    enabled: bool = True,
    budget_gb: float = DEFAULT_BUDGET_BYTES / 2**30,
    reporter: Reporter | None = None,
) -> LayerReuse:
    """The reuse session of a sweep over ``scope_names`` (off, with its reason, when the scope
    starts at layer 0 or the embeddings, or reuse is disabled)."""
    reporter = reporter or NULL_REPORTER
    plan = plan_reuse(model, arch, scope_names, n_conditions, enabled=enabled)
    if plan.from_layer is not None:
        reporter.info(
            f"layer reuse: hidden states below layer {plan.from_layer} are computed once for "
            "the sweep (--no-layer-reuse to compute them per condition)"
        )
    return LayerReuse(model, arch, plan, budget_bytes=int(budget_gb * 2**30), reporter=reporter)
