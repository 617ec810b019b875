"""Resolving a model reference (local folder, hub name, ``toy``) and explaining hub failures.

:func:`_resolve_source` turns what the user typed into what ``from_pretrained`` gets;
:func:`_hub_error` turns the many ways the Hugging Face hub fails (offline, unreachable, gated,
missing) into one actionable line; :func:`_load_config` reads and checks the config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cwa.errors import InvalidInput, ModelLoadError, UnsupportedArchitecture
from cwa.progress import Reporter

TOY_VARIANTS: dict[str, str] = {"toy": "gpt2", "toy-gpt2": "gpt2", "toy-llama": "llama"}

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


def _cached_folder(repo_id: str, offline: bool) -> Path | None:
    """Snapshot folder of a hub model in the local cache (for the record), if resolvable."""
    try:
        from transformers.utils import cached_file

        config_file = cached_file(repo_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - provenance only; never fail a load over it
        return None
    return Path(config_file).parent if config_file else None
