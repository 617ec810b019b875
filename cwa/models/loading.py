"""Loading causal language models for analysis.

:func:`load_model` turns a model reference (a local Hugging Face folder, a hub name, or the
built-in ``toy`` / ``toy-llama``) into a :class:`LoadedModel`: the model in ``eval()`` mode on
the requested device and dtype, its tokenizer, its :class:`ArchitectureMap`, and a
fingerprint of config plus weights that every run records, so results can be tied to the
exact weights they were computed on. Every failure a user can fix (missing folder, hub
offline or unreachable, not a causal LM, device absent) is a one-line
:class:`~cwa.errors.CwaError` naming the fix. Resolving references and hub errors live in
:mod:`cwa.models.sources`, fingerprinting in :mod:`cwa.models.fingerprint` (both re-exported).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cwa.errors import InvalidInput, ModelLoadError, UnsupportedArchitecture
from cwa.models.architecture import ArchitectureMap, build_architecture_map
from cwa.models.fingerprint import (  # noqa: F401  (re-exported)
    _FINGERPRINT_CHUNK_ELEMENTS,
    canonical_config_json,
    model_fingerprint,
)
from cwa.models.sources import (  # noqa: F401  (re-exported)
    _NETWORK_ERRORS,
    TOY_VARIANTS,
    _cached_folder,
    _exception_chain,
    _hub_error,
    _hub_offline,
    _load_config,
    _one_line,
    _resolve_source,
)
from cwa.progress import NULL_REPORTER, Reporter


class DeviceUnavailable(InvalidInput):
    """The requested device (cuda, cuda:N, mps) does not exist on this machine."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for analysis, with everything a run records about it."""

    model: nn.Module
    tokenizer: Any
    ref: str  # what the user asked for ("gpt2", "./my-model", "toy")
    path: str | None  # local folder the weights came from, when known
    fingerprint: str  # sha256 hex of canonical config + every parameter's bytes
    device: str  # e.g. "cpu", "cuda:0"
    dtype: str  # parameter dtype, e.g. "float32"
    arch: ArchitectureMap
    attn_implementation: str  # e.g. "eager", "sdpa"


# ---------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; checks that the device exists."""
    spec = (device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} requested but CUDA is not available "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(
                f"device {device!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of those or use --device auto"
            )
        return torch.device("cuda", index)
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceUnavailable(
                "device 'mps' requested but Apple MPS is not available here; "
                "use --device cpu or --device auto"
            )
        return torch.device("mps")
    raise InvalidInput(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str, device: torch.device, config: Any = None) -> torch.dtype:
    """The parameter dtype to load in.

    ``auto``: float32 on the CPU (half precision there is slow and loses gradient precision),
    the checkpoint's own dtype on an accelerator (float32 when the checkpoint does not say).
    """
    spec = (dtype or "auto").strip().lower()
    if spec in DTYPES:
        return DTYPES[spec]
    if spec != "auto":
        raise InvalidInput(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype) and stored.is_floating_point:
        return stored
    if isinstance(stored, str) and stored.removeprefix("torch.") in DTYPES:
        return DTYPES[stored.removeprefix("torch.")]
    return torch.float32


def _check_causal_lm(config: Any, ref: str, trust_remote_code: bool) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    model_type = getattr(config, "model_type", "?")
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no causal-LM class"
    raise UnsupportedArchitecture(
        f"{ref!r} is a {model_type!r} model ({archs}), not a causal language model; cwa "
        "analyses models that AutoModelForCausalLM loads (GPT-2, Llama, Mistral, Qwen, ...)"
    )


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    reporter: Reporter | None = None,
    load_tokenizer: bool = True,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM by local folder, Hugging Face name, GGUF file, or ``toy`` / ``toy-llama``.

    ``dtype``: auto|float32|bfloat16|float16 (see :func:`resolve_dtype`); ``device``:
    auto|cpu|cuda|cuda:N|mps (see :func:`resolve_device`); ``attn_implementation``: None for
    the transformers default, or e.g. ``"eager"`` (needed for double backward) / ``"sdpa"``.
    The model comes back in ``eval()`` mode. ``load_tokenizer=False`` skips the tokenizer
    (``tokenizer`` is then None), for commands that only look at weights. ``device_map``:
    ``auto``/``balanced``/... or a {module: device} dict, loaded through accelerate (see
    :mod:`cwa.models.device_map`); checked against the model before any weight is read.
    """
    reporter = reporter or NULL_REPORTER
    torch_device = resolve_device(device)
    from cwa.models.device_map import check_device_map, describe, parse_device_map
    from cwa.models.gguf import find_gguf, load_gguf  # a .gguf file: cwa/models/gguf.py

    device_map = parse_device_map(device_map)
    gguf = find_gguf(ref)
    if gguf is not None and device_map is not None:
        raise InvalidInput(
            "--device-map applies to Hugging Face folders and names, not GGUF files; convert "
            "the GGUF with save_pretrained, or load it on one --device"
        )
    if gguf is not None:
        return load_gguf(
            gguf,
            ref=ref,
            dtype=dtype,
            device=torch_device,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            load_tokenizer=load_tokenizer,
            reporter=reporter,
        )
    source, folder = _resolve_source(ref, reporter)
    local = folder is not None
    offline = _hub_offline()
    config = _load_config(source, ref, local, trust_remote_code, offline)
    _check_causal_lm(config, ref, trust_remote_code)
    if device_map is not None:
        check_device_map(device_map, config, trust_remote_code)
        first_device = next(
            (torch.device(d if not isinstance(d, int) else f"cuda:{d}") for d in
             (device_map.values() if isinstance(device_map, dict) else []) if d != "disk"),
            torch_device,
        )  # fmt: skip
        torch_device = first_device
    torch_dtype = resolve_dtype(dtype, torch_device, config)

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "local_files_only": offline or local,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
        kwargs["offload_folder"] = _offload_folder()
    elif torch_device.type != "cpu":
        kwargs["device_map"] = str(torch_device)  # load straight onto the accelerator
    reporter.info(f"loading {ref} ({str(torch_dtype).removeprefix('torch.')}, {torch_device})")
    try:
        with _quiet_transformers_progress():
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                source, output_loading_info=True, **kwargs
            )
    except (ValueError, ImportError) as exc:
        if attn_implementation and "attn" in str(exc).lower():
            raise InvalidInput(
                f"attention implementation {attn_implementation!r} is not usable here "
                f"({_one_line(exc, 100)}); use eager or sdpa"
            ) from exc
        raise ModelLoadError(f"could not load {ref!r}: {_one_line(exc)}") from exc
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"out of memory loading {ref!r} on {torch_device}; try --dtype bfloat16, another "
            "device, or a smaller model"
        ) from exc
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the weights of {ref!r} do not fit its config ({_one_line(exc, 100)}); re-save the "
            "model with save_pretrained"
        ) from exc
    except OSError as exc:
        if local:
            raise ModelLoadError(
                f"could not load the weights in {source!r} ({_one_line(exc, 100)}); the folder "
                "needs model.safetensors (or pytorch_model.bin) written by save_pretrained"
            ) from exc
        raise _hub_error(ref, exc, offline) from exc
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        # transformers would fill these with random values and carry on; an analysis of a
        # partly random model is meaningless, so refuse.
        raise ModelLoadError(
            f"the checkpoint of {ref!r} lacks {len(missing)} weight(s) the model needs (e.g. "
            f"{missing[0]}), which would be random; re-save the complete model"
        )
    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    if unexpected:
        reporter.warn(
            f"ignored {len(unexpected)} checkpoint tensor(s) the model does not use (e.g. "
            f"{unexpected[0]})"
        )
    if device_map is None and next(model.parameters()).device != torch_device:
        model = model.to(torch_device)
    model.eval()

    tokenizer = None
    if load_tokenizer:
        tokenizer = _load_tokenizer(source, ref, trust_remote_code, local, offline)

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if tokenizer is not None and isinstance(embeddings, nn.Embedding):
        rows = embeddings.num_embeddings
        if len(tokenizer) > rows:
            reporter.warn(
                f"tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
                "token ids beyond that will fail"
            )
    if folder is None:
        folder = _cached_folder(source, offline)
    arch = build_architecture_map(model)
    from cwa.models.fingerprint_cache import cached_model_fingerprint, weight_files

    # Hashed once per state of the weight files (path, size, mtime, header), then cached.
    fingerprint = cached_model_fingerprint(model, weight_files(folder), reporter=reporter)
    first = next(model.parameters())
    attn = getattr(model.config, "_attn_implementation", None) or attn_implementation or "default"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref=ref,
        path=str(folder) if folder is not None else None,
        fingerprint=fingerprint,
        device=describe(model, str(first.device)),
        dtype=str(first.dtype).removeprefix("torch."),
        arch=arch,
        attn_implementation=str(attn),
    )


def _offload_folder() -> str:
    """A per-process folder for weights a device map puts on 'disk' (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="cwa-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' own tqdm bars while loading (the caller's reporter reports)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_tokenizer(
    source: str, ref: str, trust_remote_code: bool, local: bool, offline: bool
) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local or offline
        )
    except OSError as exc:
        if not local and _NETWORK_ERRORS & {type(e).__name__ for e in _exception_chain(exc)}:
            raise _hub_error(ref, exc, offline) from exc
        raise ModelLoadError(
            f"{ref!r} has no usable tokenizer ({_one_line(exc, 100)}); save the tokenizer next "
            "to the model (tokenizer.save_pretrained on the same folder)"
        ) from exc
    except (ValueError, TypeError, ImportError) as exc:
        raise ModelLoadError(
            f"the tokenizer of {ref!r} could not be built ({_one_line(exc, 100)}); save a "
            "tokenizer.json next to the model"
        ) from exc
    # transformers 5 builds an empty tokenizer (special tokens only) for a folder that has no
    # tokenizer files at all; using it would silently turn every text into unknown tokens.
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    if len(set(tokenizer.get_vocab()) - specials) == 0:
        raise ModelLoadError(
            f"{ref!r} has no usable tokenizer (its vocabulary is empty: no tokenizer files "
            "next to the model); save the tokenizer in the same folder (save_pretrained)"
        )
    return tokenizer
