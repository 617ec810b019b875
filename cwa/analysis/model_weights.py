"""Weight values and architecture of a scored model, without loading the model.

Analyzers that need |w| (``clusters``) read the checkpoint's safetensors files lazily, one
tensor at a time, instead of materialising the model: the architecture map comes from the
model class instantiated on the ``meta`` device (shapes only, no weight memory) and each
weight tensor is read from its file when asked for. Checkpoint keys are matched to parameter
names exactly or by suffix (old GPT-2 checkpoints store ``h.0.attn...`` for the model's
``transformer.h.0.attn...``); a tied output embedding is served from the tensor it is tied to.

When the folder has no safetensors files (``pytorch_model.bin``, GGUF) or a name cannot be
matched, :func:`open_model_weights` falls back to loading the model with
:func:`cwa.models.loading.load_model` and serves ``named_parameters()``; ``source`` says which
path was taken. Reading the files does not re-check the run's model fingerprint (that would
need every byte); a changed checkpoint with the same shapes would go unnoticed, so the
fallback is also available on request (``load=True``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput


@dataclass
class ModelWeights:
    """Lazy access to a model's weights by parameter name, plus its architecture map."""

    arch: Any  # cwa.models.architecture.ArchitectureMap
    source: str  # "safetensors" or "loaded model"
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)  # param -> safe_open handle
    _keys: dict[str, str] = field(default_factory=dict, repr=False)  # param -> checkpoint key
    _params: dict[str, Any] = field(default_factory=dict, repr=False)  # loaded-model fallback

    def get(self, name: str) -> Any:
        """The weight tensor of parameter ``name`` (CPU, float32, parameter shape)."""
        import torch

        if name in self._params:
            tensor = self._params[name].detach()
        elif name in self._keys:
            tensor = self._handles[name].get_tensor(self._keys[name])
        else:
            raise InvalidInput(f"no weights for parameter {name!r} in this model's checkpoint")
        shape = self.arch.params[name].shape
        if tuple(tensor.shape) != tuple(shape):
            raise InvalidInput(
                f"checkpoint tensor for {name!r} has shape {tuple(tensor.shape)}, the model "
                f"{tuple(shape)}; the model folder changed since it was scored"
            )
        return tensor.to(device="cpu", dtype=torch.float32)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / f for f in weight_map.values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _match_keys(param_names: list[str], keys: list[str]) -> dict[str, str] | None:
    """Parameter name -> checkpoint key (exact, else the unique key that is a dotted suffix)."""
    key_set = set(keys)
    matched: dict[str, str] = {}
    for name in param_names:
        if name in key_set:
            matched[name] = name
            continue
        candidates = [k for k in keys if name.endswith("." + k) or k.endswith("." + name)]
        if len(candidates) != 1:
            return None
        matched[name] = candidates[0]
    return matched


def _meta_architecture(folder: Path, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cwa.models.architecture import build_architecture_map

    config = AutoConfig.from_pretrained(
        str(folder), trust_remote_code=trust_remote_code, local_files_only=True
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return build_architecture_map(model)


def _model_folder(ref: str) -> Path | None:
    from cwa.models.loading import TOY_VARIANTS

    if ref.lower() in TOY_VARIANTS:
        from cwa.toy import ensure_toy_model

        return Path(ensure_toy_model(TOY_VARIANTS[ref.lower()]))
    candidate = Path(ref).expanduser()
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate.resolve()
    try:  # a hub name already in the local cache
        from transformers.utils import cached_file

        config_file = cached_file(ref, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: the caller falls back to loading
        return None
    return Path(config_file).parent if config_file else None


def weights_available(model_ref: str) -> bool:
    """Whether the weights of ``model_ref`` can be read locally (checkpoint files present)."""
    folder = _model_folder(model_ref)
    if folder is None:
        return False
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return any((folder / n).is_file() for n in names) or bool(list(folder.glob("*.gguf")))


@contextmanager
def open_model_weights(
    model_ref: str,
    *,
    arch: Any = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    load: bool = False,
    reporter: Any = None,
) -> Iterator[ModelWeights]:
    """Weights of ``model_ref`` read lazily from its safetensors files (see module docstring).

    ``arch``: the model's ArchitectureMap when the caller has it already (built from the
    config on the meta device otherwise).
    """
    from safetensors import safe_open

    folder = None if load else _model_folder(model_ref)
    files = _safetensors_files(folder) if folder is not None else []
    with ExitStack() as stack:
        if files:
            if arch is None:
                arch = _meta_architecture(folder, trust_remote_code)  # type: ignore[arg-type]
            handles = {}
            for path in files:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                for key in handle.keys():
                    handles[key] = handle
            names = list(arch.params)
            matched = _match_keys(names, list(handles))
            if matched is not None:
                yield ModelWeights(
                    arch=arch,
                    source="safetensors",
                    _handles={n: handles[k] for n, k in matched.items()},
                    _keys=matched,
                )
                return
        from cwa.models.loading import load_model

        loaded = load_model(
            model_ref,
            dtype=dtype,
            device="cpu",
            trust_remote_code=trust_remote_code,
            load_tokenizer=False,
            reporter=reporter,
        )
        yield ModelWeights(
            arch=loaded.arch,
            source="loaded model",
            _params=dict(loaded.model.named_parameters()),
        )
