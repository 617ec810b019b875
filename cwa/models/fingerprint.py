"""Model fingerprints: sha256 over the canonical config and every weight's bytes.

Every run records the fingerprint of the model it used, so results are tied to the exact
weights; evaluations are reused only for an equal fingerprint. Run-time and provenance keys of
the config (paths, dtype, attention implementation, ...) are left out, so the same weights give
the same fingerprint wherever and however they are loaded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from cwa.errors import ModelLoadError
from cwa.progress import NULL_REPORTER, Reporter

# Config keys that describe how a model is run or where it came from, not what it computes;
# left out of the fingerprint so that the same weights always give the same fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

_FINGERPRINT_CHUNK_ELEMENTS = 1 << 24  # hash large tensors in slices to bound host memory


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _strip_volatile(v)
            for k, v in value.items()
            if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_attn_implementation")
        }
    if isinstance(value, list | tuple):
        return [_strip_volatile(v) for v in value]
    return value


def canonical_config_json(model: nn.Module) -> str:
    """The model's config as sorted, compact JSON without run-time/provenance keys."""
    config = getattr(model, "config", None)
    data: dict[str, Any]
    if config is None:
        data = {}
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        data = dict(vars(config))
    data = _strip_volatile(data)
    data["__class__"] = type(model).__name__
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def model_fingerprint(model: nn.Module, *, reporter: Reporter | None = None) -> str:
    """sha256 (hex) over the canonical config JSON and every parameter's name, dtype, shape
    and bytes, parameters in name order, tied tensors once.

    Deterministic: the same weights give the same fingerprint on any device; changing any
    single weight changes it. Tensors are hashed one by one (large ones in slices), so the
    extra memory is bounded by one slice.
    """
    reporter = reporter or NULL_REPORTER
    digest = hashlib.sha256()
    digest.update(b"cwa-fingerprint-v1\0")
    digest.update(canonical_config_json(model).encode("utf-8"))
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    task = reporter.task("fingerprinting weights", len(params))
    try:
        for name, param in params:
            tensor = param.detach()
            if tensor.device.type == "meta" and hasattr(model, "hf_device_map"):
                from cwa.models.device_map import offloaded_value  # weights offloaded to disk

                tensor = offloaded_value(model, name).detach()
            if tensor.device.type == "meta":
                raise ModelLoadError(
                    f"parameter {name} has no data (meta device); load the weights before "
                    "fingerprinting"
                )
            header = f"\0{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}"
            digest.update(header.encode("utf-8"))
            flat = tensor.contiguous().reshape(-1)
            for start in range(0, flat.numel(), _FINGERPRINT_CHUNK_ELEMENTS):
                chunk = flat[start : start + _FINGERPRINT_CHUNK_ELEMENTS].cpu()
                digest.update(chunk.view(torch.uint8).numpy().tobytes())
            task.advance()
    finally:
        task.close()
    return digest.hexdigest()
