"""``--device-map auto|balanced|FILE.json``: models spread over several devices (accelerate).

A device map says where each module's weights live: ``auto`` / ``balanced`` /
``balanced_low_0`` / ``sequential`` let accelerate plan it from the free memory of the devices;
a JSON file ``{"module.path": device}`` assigns modules explicitly, where a device is a GPU
index (``0``), ``"cuda:N"``, ``"mps"``, ``"cpu"`` or ``"disk"`` (weights kept in an offload
folder and brought in module by module during the forward). transformers loads the model
through accelerate's ``dispatch_model``: hooks move each module's inputs to its device, so a
forward pass works from inputs on the input embedding's device (:func:`input_device`).

Checked before a run is registered (:func:`check_device_map`): a file that is not a JSON
object of module -> device, an unknown or absent device, a key that names no module of the
model, and a parameter or buffer that no key covers are refused, each with its fix.

Offloaded weights (``"disk"``, or ``"cpu"`` next to a GPU) are ``meta`` tensors in the module
between forwards: evaluation and fingerprinting read them (:func:`offloaded_value`), but
gradients and in-place perturbation need real tensors, so score, rank and perturb refuse a
map that offloads (:func:`require_materialized`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?)$")


def parse_device_map(spec: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """A strategy name, or the module -> device dict of a JSON file (devices checked)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise InvalidInput(
            "--device-map needs accelerate; pip install 'cwa[multi-device]'"
        ) from exc
    if isinstance(spec, dict):
        mapping: Any = spec
        where = "the device map"
    else:
        text = spec.strip()
        if text in STRATEGIES:
            return text
        path = Path(text).expanduser()
        if not path.is_file():
            raise InvalidInput(
                f"--device-map {text!r} is neither {', '.join(STRATEGIES)} nor a JSON file; "
                "give a strategy or the path of a {module: device} JSON file"
            )
        where = str(path)
        try:
            mapping = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{where} is not valid JSON ({exc.msg}); fix the file") from exc
    if not isinstance(mapping, dict) or not mapping:
        raise InvalidInput(f"{where} must be a non-empty JSON object {{module: device}}")
    return {str(module): _check_device(where, str(module), device) for module, device in
            mapping.items()}  # fmt: skip


def _check_device(where: str, module: str, device: Any) -> int | str:
    if isinstance(device, bool):
        raise InvalidInput(f"{where}: {module!r} -> {device!r} is not a device")
    if isinstance(device, int):
        device = f"cuda:{device}"
    text = str(device).strip().lower()
    if not _DEVICE.match(text):
        raise InvalidInput(
            f"{where}: {module!r} -> {device!r} is not a device; use a GPU index, cuda:N, mps, "
            "cpu or disk"
        )
    if text.startswith("cuda") or text == "mps":
        from cwa.models.loading import resolve_device

        resolved = resolve_device(text)  # an absent device: DeviceUnavailable with the fix
        return resolved.index if resolved.type == "cuda" else text
    return text


def check_device_map(
    device_map: str | dict[str, Any], config: Any, trust_remote_code: bool
) -> None:
    """Every key names a module and every parameter/buffer is placed (on a meta skeleton)."""
    if isinstance(device_map, str):
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # A tied lm_head stays a separate entry here, as accelerate's own check wants it placed.
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = sorted(key for key in device_map if key not in modules)
    if unknown:
        raise InvalidInput(
            f"the device map names {unknown[0]!r}, which is not a module of this model; use "
            "module paths like those of `cwa model inspect` (e.g. model.layers.0)"
        )
    tensors = [name for name, _ in skeleton.named_parameters()]
    tensors += [name for name, _ in skeleton.named_buffers()]
    for name in tensors:
        if "" in device_map:
            break
        parts = name.split(".")
        if not any(".".join(parts[:i]) in device_map for i in range(1, len(parts))):
            raise InvalidInput(
                f"the device map places no module holding {name!r}; add its module (or a parent "
                "such as the layer) to the map"
            )


def describe(model: Any, fallback: str) -> str:
    """The devices a dispatched model uses, e.g. ``cpu+disk`` (``fallback`` when not mapped)."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return fallback
    names = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in mapping.values()}
    return "+".join(sorted(names))


def is_offloaded(model: Any) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def require_materialized(model: Any, stage: str) -> None:
    """Refuse offloaded weights where gradients or in-place edits need real tensors."""
    if is_offloaded(model):
        raise InvalidInput(
            f"{stage} needs every weight on a device (gradients, in-place perturbation) but the "
            "device map offloads some ('disk', or 'cpu' next to a GPU); map them to a device, "
            "or use offloading for cwa evaluate"
        )


def input_device(model: Any) -> Any:
    """Where token ids go: the input embedding's device (its execution device if offloaded)."""
    import torch

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hook = getattr(embeddings, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def offloaded_value(model: Any, name: str) -> Any:
    """The stored tensor of an offloaded (meta) parameter, read from accelerate's weights map."""
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        from cwa.errors import ModelLoadError

        raise ModelLoadError(f"parameter {name} is on the meta device and has no offloaded copy")
    return weights[local]
