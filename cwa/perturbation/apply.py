"""Apply a perturbation in place and undo it exactly, with proof.

:func:`apply_perturbation` works directly on the model's parameter storage: for each touched
tensor it checksums the whole tensor, saves only the selected entries (``index_select`` on the
flat view), computes their new values with the method and writes them with ``index_copy_``.
Nothing else is copied: the extra memory is one saved original per selected weight (plus, during
the call, its new value). :func:`restore_exact` writes the originals back and proves the result:
the restored entries must read back bit-identical to the saved ones and the checksum of every
touched tensor must equal its checksum before the perturbation; otherwise it raises
:class:`~cwa.errors.RestoreError` naming the tensors. :func:`perturbed` is the context manager a
sweep uses: the model is restored even when the body (an evaluation) raises.

A sweep that perturbs the same model many times can checksum the touched tensors once
(:func:`~cwa.perturbation.checksum.named_checksums`) and pass them as ``baseline_checksums``:
each condition then hashes only after restoring, and is proven to be back at the baseline.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from cwa.errors import InvalidInput, RestoreError
from cwa.perturbation.checksum import combine_checksums, tensor_checksum
from cwa.perturbation.methods import MethodContext, PerturbationMethod, bit_pattern, int_view_dtype
from cwa.perturbation.scope import NamedParams, named_parameter_dict
from cwa.progress import NULL_REPORTER, Reporter


def get_method(method: str | PerturbationMethod) -> PerturbationMethod:
    """A method object from its registered name (or the object itself)."""
    if isinstance(method, PerturbationMethod):
        return method
    from cwa.perturbation import PERTURBATION_METHODS
    from cwa.perturbation.methods import as_method

    name = PERTURBATION_METHODS.canonical(method)
    return as_method(PERTURBATION_METHODS.get(name), name)


@dataclass(eq=False)
class PerturbationHandle:
    """What :func:`restore_exact` needs, and what a run records about one condition.

    ``k`` is the number of selected weights, ``n_changed`` how many of them had their stored
    bits changed, ``n_value_changed`` how many compare unequal afterwards (``-0.0`` vs ``+0.0``
    changes bits but not the value; NaN -> NaN counts as unchanged). A method that changed
    nothing shows as ``n_changed < k``.
    """

    method: str
    scale: float | None
    bits: dict[str, int]  # storage dtype -> bit flipped (bit_flip only)
    seed: int
    k: int
    n_changed: int
    n_value_changed: int
    changed_by_param: dict[str, int]
    checksums_before: dict[str, str]
    checksums_after: dict[str, str] | None = None
    restored: bool = False
    _flat: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _whole: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _indices: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def bit(self) -> int | None:
        """The flipped bit when every touched tensor has the same dtype, else None."""
        values = set(self.bits.values())
        return values.pop() if len(values) == 1 else None

    @property
    def saved_bytes(self) -> int:
        """Bytes held to undo the perturbation: saved originals plus their indices."""
        return sum(
            t.numel() * t.element_size() + i.numel() * i.element_size()
            for t, i in zip(self._originals.values(), self._indices.values(), strict=True)
        )

    def record(self) -> dict[str, Any]:
        """JSON-able summary for the run store (one perturbation condition)."""
        return {
            "method": self.method,
            "scale": self.scale,
            "bit": self.bit,
            "bits": dict(self.bits),
            "seed": self.seed,
            "k": self.k,
            "n_changed": self.n_changed,
            "n_value_changed": self.n_value_changed,
            "checksum_before": combine_checksums(self.checksums_before),
            "checksum_after": (
                None if self.checksums_after is None else combine_checksums(self.checksums_after)
            ),
            "restored": self.restored,
        }


def _validated_indices(name: str, idx: Any, numel: int) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise InvalidInput(
            f"selection of {name!r} must be a 1-D int64 tensor of flat indices, got "
            f"{idx.dtype} with shape {tuple(idx.shape)}; build it with cwa.perturbation.selection"
        )
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all()):
            raise InvalidInput(
                f"selection of {name!r} must be sorted, unique flat indices in [0, {numel}); "
                "build it with cwa.perturbation.selection"
            )
    return idx


def _check_target(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise InvalidInput(
            f"parameter {name!r} is on the meta device (offloaded); load the model fully onto "
            "one device to perturb it"
        )
    if not tensor.is_contiguous():
        raise InvalidInput(
            f"parameter {name!r} is not contiguous, so its flat indices do not address its "
            "storage; make it contiguous (param.data = param.data.contiguous()) first"
        )
    int_view_dtype(tensor.dtype)  # raises for non-float weights
    return tensor.detach()


def apply_perturbation(
    target: NamedParams,
    selection: Mapping[str, torch.Tensor],
    method: str | PerturbationMethod,
    *,
    scale: float | None = None,
    bit: int | None = None,
    seed: int = 0,
    baseline_checksums: Mapping[str, str] | None = None,
    checksum_algorithm: str | None = None,
    reporter: Reporter | None = None,
) -> PerturbationHandle:
    """Perturb the selected weights of ``target`` (a model, or name -> tensor) in place.

    ``selection`` maps parameter names to sorted unique int64 flat indices (a
    :class:`~cwa.perturbation.selection.Selection`). ``scale`` and ``bit`` are refused by
    methods that do not use them (nothing is silently ignored). ``baseline_checksums`` (name ->
    checksum) replaces hashing the touched tensors before the change. Either everything is
    written or, if writing fails, nothing is left changed.
    """
    reporter = reporter or NULL_REPORTER
    perturbation = get_method(method)
    scale_used = perturbation.resolve_scale(scale)
    params, aliases = named_parameter_dict(target)

    touched: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, whole tensor, indices)
    bits: dict[str, int] = {}
    for name, raw_idx in selection.items():
        if name not in params:
            hint = f" (it is tied to {aliases[name]!r}: use that name)" if name in aliases else ""
            raise InvalidInput(
                f"selection names {name!r}, which is not a parameter of the model{hint}; "
                "rebuild the selection for this model"
            )
        whole = _check_target(name, params[name])
        idx = _validated_indices(name, raw_idx, whole.numel())
        resolved_bit = perturbation.resolve_bit(bit, whole.dtype)
        if resolved_bit is not None:
            bits[str(whole.dtype).removeprefix("torch.")] = resolved_bit
        if idx.numel():
            touched.append((name, whole, idx.to(whole.device)))

    # Two names on one storage (tied weights passed as a state dict) would be perturbed twice
    # and restored in the wrong order: refuse.
    storage_owner: dict[int, str] = {}
    for name, whole, _ in touched:
        pointer = whole.untyped_storage().data_ptr()
        if pointer in storage_owner:
            raise InvalidInput(
                f"{storage_owner[pointer]!r} and {name!r} share storage (tied weights); select "
                "each weight under one name only"
            )
        storage_owner[pointer] = name

    checksums_before = {
        name: (
            baseline_checksums[name]
            if baseline_checksums is not None and name in baseline_checksums
            else tensor_checksum(whole, checksum_algorithm)
        )
        for name, whole, _ in touched
    }

    # Compute every new value before writing anything, so that a failing method leaves the
    # model untouched.
    originals: dict[str, torch.Tensor] = {}
    new_values: dict[str, torch.Tensor] = {}
    changed_by_param: dict[str, int] = {}
    n_value_changed = 0
    for name, whole, idx in touched:
        flat = whole.view(-1)
        original = flat.index_select(0, idx)
        ctx = MethodContext(
            param_name=name,
            tensor=whole,
            scale=scale_used,
            bit=perturbation.resolve_bit(bit, whole.dtype),
            seed=int(seed),
        )
        new = perturbation.compute(original, ctx)
        if new.shape != original.shape or new.dtype != original.dtype or new.device != flat.device:
            raise InvalidInput(
                f"method {perturbation.name!r} returned {new.dtype}{tuple(new.shape)} on "
                f"{new.device} for {name!r}; it must return {original.dtype}"
                f"{tuple(original.shape)} on {flat.device}"
            )
        changed_by_param[name] = int((bit_pattern(new) != bit_pattern(original)).sum())
        same_value = (new == original) | (torch.isnan(new) & torch.isnan(original))
        n_value_changed += int((~same_value).sum())
        originals[name] = original
        new_values[name] = new

    written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, whole, idx in touched:
                flat = whole.view(-1)
                flat.index_copy_(0, idx, new_values[name])
                written.append((flat, idx, originals[name]))
    except BaseException:
        with torch.no_grad():
            for flat, idx, original in written:
                flat.index_copy_(0, idx, original)
        raise

    k = sum(int(idx.numel()) for _, _, idx in touched)
    n_changed = sum(changed_by_param.values())
    if n_changed < k:
        reporter.warn(
            f"{perturbation.name}: {k - n_changed} of {k} selected weights kept their exact "
            "bits (e.g. zeroing weights that are already zero)"
        )
    return PerturbationHandle(
        method=perturbation.name,
        scale=scale_used,
        bits=bits,
        seed=int(seed),
        k=k,
        n_changed=n_changed,
        n_value_changed=n_value_changed,
        changed_by_param=changed_by_param,
        checksums_before=checksums_before,
        _flat={name: whole.view(-1) for name, whole, _ in touched},
        _whole={name: whole for name, whole, _ in touched},
        _indices={name: idx for name, _, idx in touched},
        _originals=originals,
    )


def restore_exact(handle: PerturbationHandle) -> dict[str, str]:
    """Write the saved originals back and prove every touched tensor is bit-identical to before.

    Returns the checksums after restoration (name -> checksum). Raises
    :class:`~cwa.errors.RestoreError` if any restored entry or any touched tensor differs from
    its state before the perturbation. Calling it again after a success is a no-op.
    """
    if handle.restored and handle.checksums_after is not None:
        return dict(handle.checksums_after)
    problems: list[str] = []
    with torch.no_grad():
        for name, flat in reversed(handle._flat.items()):  # undo in reverse order of writing
            try:
                flat.index_copy_(0, handle._indices[name], handle._originals[name])
            except Exception as exc:  # keep restoring the other tensors, then report
                problems.append(f"{name}: write failed ({exc})")
    checksums_after: dict[str, str] = {}
    for name, flat in handle._flat.items():
        readback = flat.index_select(0, handle._indices[name])
        if not torch.equal(bit_pattern(readback), bit_pattern(handle._originals[name])):
            problems.append(f"{name}: restored entries differ from the saved originals")
        before = handle.checksums_before[name]
        algorithm = before.partition(":")[0]
        after = tensor_checksum(handle._whole[name], algorithm)
        checksums_after[name] = after
        if after != before:
            problems.append(f"{name}: checksum {after} != {before} before the perturbation")
    handle.checksums_after = checksums_after
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        shown = "; ".join(problems[:3]) + more
        raise RestoreError(
            f"model not restored bit-exactly ({shown}); something else wrote to these weights "
            "during the perturbation: discard this model and reload it"
        )
    handle.restored = True
    return dict(checksums_after)


@contextmanager
def perturbed(
    target: NamedParams,
    selection: Mapping[str, torch.Tensor],
    method: str | PerturbationMethod,
    **options: Any,
) -> Iterator[PerturbationHandle]:
    """``with perturbed(model, selection, "sign_flip") as handle: evaluate(model)``.

    ``options`` are :func:`apply_perturbation`'s (``scale``, ``bit``, ``seed``,
    ``baseline_checksums``, ``checksum_algorithm``, ``reporter``). The model is restored (and
    verified) on exit, also when the body raises; a failed restoration raises
    :class:`~cwa.errors.RestoreError` (chained to the body's exception).
    """
    handle = apply_perturbation(target, selection, method, **options)
    try:
        yield handle
    finally:
        restore_exact(handle)
