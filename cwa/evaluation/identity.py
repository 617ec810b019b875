"""What a stored evaluation must match to be reused: the evaluation key.

Two evaluations of "the same model" give the same numbers only if everything that changes the
numbers is the same. The key (sha256 of canonical JSON) covers:

* the weights and config (the model fingerprint of :mod:`cwa.models.loading`);
* the tokenizer: :func:`tokenizer_fingerprint` hashes its class, its serialized backend (vocab,
  merges, normalizer, pre-tokenizer, post-processor template: for a fast tokenizer this is
  tokenizer.json) or, for a slow one, its vocabulary; its special tokens and their ids; its
  ``add_bos_token`` / ``add_eos_token`` attributes; and its observed behaviour -- the ids of a
  probe text with and without special tokens, so two folders whose tokenizer files differ
  only in whether BOS is prepended never share a result;
* whether the tokenizer adds BOS (:func:`cwa.data.calibration.adds_bos`), stated on its own;
* the parameter dtype and the attention implementation the model runs with;
* :data:`EVAL_ENGINE_VERSION`: bumped whenever the evaluation code changes its numbers, which
  invalidates every stored result.

The task side (task, data, limit, seed, window, add_bos_token override) is the task
configuration hash of :mod:`cwa.evaluation.tasks`; a result is reused only when both match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Version of the evaluation engine. History: 1 = first release; 2 = BOS-prefixed perplexity
#: windows for tokenizers that add BOS, whole-file perplexity unless the file is the
#: calibration text, per-item records; 3 = multiple-choice contexts scored once and their
#: endings from the KV cache (float-rounding-level differences from 2); 4 = a batch's contexts
#: and endings packed into one pass with a block mask, identical requests scored once
#: (float-rounding-level differences from 3).
EVAL_ENGINE_VERSION = "4"

_PROBE = "Hello world. The quick brown fox"


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of everything about ``tokenizer`` that changes token ids (see module doc)."""
    digest = hashlib.sha256()
    digest.update(b"cwa-tokenizer-v1\0")
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = None
    if backend is not None and hasattr(backend, "to_str"):
        try:
            serialized = backend.to_str()
        except Exception:  # noqa: BLE001 - fall back to the vocabulary below
            serialized = None
    if serialized is not None:
        digest.update(b"\0backend\0" + serialized.encode("utf-8"))
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(b"\0vocab\0" + _canonical(vocab).encode("utf-8"))
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None)
        for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
    }
    state = {
        "special_ids": specials,
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "added_vocab": sorted((getattr(tokenizer, "get_added_vocab", dict)() or {}).items()),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "probe_default": list(tokenizer(_PROBE)["input_ids"]),
        "probe_plain": list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"]),
    }
    digest.update(b"\0state\0" + _canonical(state).encode("utf-8"))
    return digest.hexdigest()


def evaluation_identity(loaded: Any) -> dict[str, Any]:
    """The parts of the evaluation key of a :class:`~cwa.models.loading.LoadedModel`."""
    from cwa.data.calibration import adds_bos

    tokenizer = loaded.tokenizer
    return {
        "engine": EVAL_ENGINE_VERSION,
        "model_fingerprint": loaded.fingerprint,
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "adds_bos": None if tokenizer is None else adds_bos(tokenizer),
        "dtype": str(loaded.dtype),
        "attn_implementation": str(getattr(loaded, "attn_implementation", None)),
    }


def evaluation_key(loaded: Any) -> str:
    """sha256 (hex) of :func:`evaluation_identity`: equal keys give equal numbers."""
    return hashlib.sha256(_canonical(evaluation_identity(loaded)).encode("utf-8")).hexdigest()
