"""Loading causal language models for analysis, and fingerprinting their weights.

:func:`load_model` turns a model reference (a local Hugging Face folder, a hub name, or the
built-in ``toy`` / ``toy-llama``) into a :class:`LoadedModel`: the model in ``eval()`` mode on
the requested device and dtype, its tokenizer, its :class:`ArchitectureMap`, and a
fingerprint of config plus weights that every run records, so results can be tied to the
exact weights they were computed on. Every failure a user can fix (missing folder, hub
offline or unreachable, not a causal LM, device absent) is a one-line
:class:`~cwa.errors.CwaError` naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwa.errors import InvalidInput, ModelLoadError, UnsupportedArchitecture
from cwa.models.architecture import ArchitectureMap, build_architecture_map
from cwa.progress import NULL_REPORTER, Reporter


class DeviceUnavailable(InvalidInput):
    """The requested device (cuda, cuda:N, mps) does not exist on this machine."""


TOY_VARIANTS: dict[str, str] = {"toy": "gpt2", "toy-gpt2": "gpt2", "toy-llama": "llama"}

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


# ---------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Resolving a reference
# ---------------------------------------------------------------------------------------

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub
        return False
    return bool(is_offline_mode())


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _one_line(text: object, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# Exception class names (anywhere in the chain) that mean "the hub could not be reached".
_NETWORK_ERRORS = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
        "gaierror",
        "ConnectionError",
        "TimeoutError",
        "LocalEntryNotFoundError",
        "ProxyError",
        "SSLError",
        "OfflineModeIsEnabled",
    }
)


def _hub_error(ref: str, exc: BaseException, offline: bool) -> ModelLoadError:
    """Translate a hub failure into one actionable line."""
    names = {type(e).__name__ for e in _exception_chain(exc)}
    if "GatedRepoError" in names:
        return ModelLoadError(
            f"{ref!r} is a gated model on the Hugging Face hub; accept its licence on "
            "huggingface.co and log in (hf auth login), or pass a local model folder"
        )
    if "RepositoryNotFoundError" in names:
        return ModelLoadError(
            f"no model named {ref!r} on the Hugging Face hub and no local folder of that name; "
            "check the spelling or pass a local model folder"
        )
    if "RevisionNotFoundError" in names:
        return ModelLoadError(f"{ref!r}: revision not found on the hub; check the revision")
    if offline or "OfflineModeIsEnabled" in names:
        return ModelLoadError(
            f"{ref!r} is not a local folder and is not in the Hugging Face cache, and the hub is "
            "offline (HF_HUB_OFFLINE=1); pass a local model folder, or unset HF_HUB_OFFLINE and "
            "connect to download it"
        )
    if names & _NETWORK_ERRORS:
        reason = _one_line(_exception_chain(exc)[-1], 80)
        return ModelLoadError(
            f"could not reach the Hugging Face hub to fetch {ref!r} ({reason}); pass a local "
            "model folder, or set HF_HUB_OFFLINE=1 to use models already in the local cache"
        )
    if "EntryNotFoundError" in names or "RemoteEntryNotFoundError" in names:
        return ModelLoadError(
            f"{ref!r} on the Hugging Face hub has no config.json; it is not a transformers "
            "model repository"
        )
    return ModelLoadError(f"could not load {ref!r} from the Hugging Face hub: {_one_line(exc)}")


def _resolve_source(ref: str, reporter: Reporter) -> tuple[str, Path | None]:
    """(what to pass to from_pretrained, local folder or None for a hub name)."""
    if not ref or not ref.strip():
        raise InvalidInput("empty model reference; give a folder path, a hub name or 'toy'")
    ref = ref.strip()
    if ref.lower() in TOY_VARIANTS:
        try:
            from cwa.toy import ensure_toy_model
        except ImportError as exc:
            raise ModelLoadError(
                f"the built-in toy model is unavailable ({_one_line(exc)}); reinstall cwa"
            ) from exc
        folder = Path(ensure_toy_model(TOY_VARIANTS[ref.lower()], reporter=reporter))
        return str(folder), folder
    candidate = Path(ref).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise ModelLoadError(
                f"{ref!r} is a file, not a model folder; give the folder that holds config.json"
            )
        if not (candidate / "config.json").is_file():
            raise ModelLoadError(
                f"folder {str(candidate)!r} has no config.json, so it is not a Hugging Face "
                "model folder; point at the folder written by save_pretrained"
            )
        return str(candidate.resolve()), candidate.resolve()
    if not _REPO_ID_RE.match(ref) or ref.startswith((".", "~")):
        raise ModelLoadError(
            f"no model folder at {ref!r}; check the path, or give a Hugging Face model name "
            "(e.g. gpt2) or 'toy'"
        )
    return ref, None


def _load_config(source: str, ref: str, local: bool, trust_remote_code: bool, offline: bool):
    from transformers import AutoConfig

    if local:
        try:
            raw = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{source}/config.json cannot be read as JSON ({_one_line(exc, 80)}); "
                "re-save the model with save_pretrained"
            ) from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{source}/config.json is not a JSON object; re-save the model")
        if "model_type" not in raw:
            raise UnsupportedArchitecture(
                f"{source}/config.json has no model_type, so transformers cannot tell which "
                "architecture it is; re-save the model with save_pretrained"
            )
    try:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=offline or local
        )
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{ref!r} needs its own Python code to load; pass --trust-remote-code if you "
                "trust its authors"
            ) from exc
        raise UnsupportedArchitecture(
            f"{ref!r}: transformers cannot read this config ({_one_line(text, 100)}); upgrade "
            "transformers, or pass --trust-remote-code if the model ships its own code"
        ) from exc
    except OSError as exc:
        if local:
            raise ModelLoadError(f"cannot read the config of {ref!r}: {_one_line(exc)}") from exc
        raise _hub_error(ref, exc, offline) from exc


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
) -> LoadedModel:
    """Load a causal LM by local folder, Hugging Face name, GGUF file, or ``toy`` / ``toy-llama``.

    ``dtype``: auto|float32|bfloat16|float16 (see :func:`resolve_dtype`); ``device``:
    auto|cpu|cuda|cuda:N|mps (see :func:`resolve_device`); ``attn_implementation``: None for
    the transformers default, or e.g. ``"eager"`` (needed for double backward) / ``"sdpa"``.
    The model comes back in ``eval()`` mode. ``load_tokenizer=False`` skips the tokenizer
    (``tokenizer`` is then None), for commands that only look at weights.
    """
    reporter = reporter or NULL_REPORTER
    torch_device = resolve_device(device)
    from cwa.models.gguf import find_gguf, load_gguf  # a .gguf file: cwa/models/gguf.py

    gguf = find_gguf(ref)
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
    if torch_device.type != "cpu":
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
    if next(model.parameters()).device != torch_device:
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
    fingerprint = model_fingerprint(model, reporter=reporter)
    first = next(model.parameters())
    attn = getattr(model.config, "_attn_implementation", None) or attn_implementation or "default"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref=ref,
        path=str(folder) if folder is not None else None,
        fingerprint=fingerprint,
        device=str(first.device),
        dtype=str(first.dtype).removeprefix("torch."),
        arch=arch,
        attn_implementation=str(attn),
    )


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


def _cached_folder(repo_id: str, offline: bool) -> Path | None:
    """Snapshot folder of a hub model in the local cache (for the record), if resolvable."""
    try:
        from transformers.utils import cached_file

        config_file = cached_file(repo_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - provenance only; never fail a load over it
        return None
    return Path(config_file).parent if config_file else None
