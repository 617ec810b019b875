"""Loading GGUF checkpoints (llama.cpp's format) through transformers' GGUF support.

``--model path/model.gguf`` -- or a folder that holds exactly one ``.gguf`` file and no
``config.json`` -- is loaded with ``from_pretrained(folder, gguf_file=name)``: transformers
reads the architecture, the tokenizer and the (possibly quantized) tensors from the file and
dequantizes every tensor to the requested dtype (``--dtype``; float32 on the CPU by default).
The result is an ordinary Hugging Face model, so every metric, perturbation and evaluation
works on it; the analysis is of the dequantized weights.

Needs the ``gguf`` package (and ``accelerate``, which transformers requires for GGUF): the
``cwa[gguf]`` extra. Without them the error is one line naming the extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import ModelLoadError
from cwa.progress import NULL_REPORTER, Reporter

GGUF_SUFFIX = ".gguf"
_EXTRA_HINT = "pip install 'cwa[gguf]' (the gguf and accelerate packages)"


@dataclass(frozen=True)
class GgufRef:
    folder: Path
    filename: str

    @property
    def path(self) -> Path:
        return self.folder / self.filename


def find_gguf(ref: str) -> GgufRef | None:
    """The GGUF file ``ref`` names (a .gguf file, or a folder with one and no config.json)."""
    if not ref or not ref.strip():
        return None
    candidate = Path(ref.strip()).expanduser()
    if candidate.is_file() and candidate.suffix.lower() == GGUF_SUFFIX:
        resolved = candidate.resolve()
        return GgufRef(resolved.parent, resolved.name)
    if candidate.is_dir() and not (candidate / "config.json").is_file():
        files = sorted(p.name for p in candidate.iterdir() if p.suffix.lower() == GGUF_SUFFIX)
        if len(files) > 1:
            raise ModelLoadError(
                f"folder {str(candidate)!r} holds {len(files)} .gguf files ({', '.join(files)}); "
                "pass the one to load, e.g. --model "
                f"{str(candidate / files[0])!r}"
            )
        if files:
            return GgufRef(candidate.resolve(), files[0])
    return None


def require_gguf_support() -> None:
    """One-line ModelLoadError naming the extra when gguf or accelerate is missing."""
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelLoadError(
            f"loading a .gguf model needs the {' and '.join(missing)} package(s); {_EXTRA_HINT}"
        )


def load_gguf(
    gguf: GgufRef,
    *,
    ref: str,
    dtype: str,
    device: Any,
    trust_remote_code: bool,
    attn_implementation: str | None,
    load_tokenizer: bool,
    reporter: Reporter | None = None,
) -> Any:
    """Load and dequantize ``gguf`` into a :class:`~cwa.models.loading.LoadedModel`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cwa.models.architecture import build_architecture_map
    from cwa.models.fingerprint_cache import cached_model_fingerprint
    from cwa.models.loading import (
        LoadedModel,
        _check_causal_lm,
        _one_line,
        _quiet_transformers_progress,
        resolve_dtype,
    )

    reporter = reporter or NULL_REPORTER
    require_gguf_support()
    source, name = str(gguf.folder), gguf.filename
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=name, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot read the architecture from {str(gguf.path)!r} ({_one_line(exc, 100)}); "
            "transformers supports GGUF files of common architectures (llama, mistral, qwen2, "
            "gpt2, ...)"
        ) from exc
    _check_causal_lm(config, ref, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device, config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    reporter.info(
        f"loading {ref} (GGUF, dequantized to {str(torch_dtype).removeprefix('torch.')}, {device})"
    )
    try:
        with _quiet_transformers_progress():
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, **kwargs)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not load {str(gguf.path)!r}: {_one_line(exc)}") from exc
    model = model.to(device).eval()
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(
                f"the tokenizer in {str(gguf.path)!r} could not be built ({_one_line(exc, 100)})"
            ) from exc
    first = next(model.parameters())
    attn = getattr(model.config, "_attn_implementation", None) or attn_implementation or "default"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref=ref,
        path=str(gguf.path),
        # Hashed once per state of the .gguf file (path, size, mtime), then cached.
        fingerprint=cached_model_fingerprint(model, [gguf.path], reporter=reporter),
        device=str(first.device),
        dtype=str(first.dtype).removeprefix("torch."),
        arch=build_architecture_map(model),
        attn_implementation=str(attn),
    )
