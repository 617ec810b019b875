"""Which calibration text a run uses, how it is recorded, and the tokenizer's BOS convention.

* :func:`resolve_calibration_source`: ``--data`` as given, else ``toy`` for the toy models and
  WikiText-2 raw train (:data:`~cwa.data.text.DEFAULT_CALIBRATION_SOURCE`) for every other
  model -- never the toy text for a real model unless asked for explicitly.
* :func:`load_calibration_texts`: the documents; a default hub source that cannot be loaded
  (offline, unreachable) is a one-line :class:`~cwa.errors.DataError` telling to pass
  ``--data FILE``.
* :func:`calibration_record`: what a run stores about its calibration text (source, whether it
  was the default, file sha256, sha256 of the documents, BOS policy, held-out fraction) and
  :func:`source_match_key`, which lets perplexity recognise "this is the calibration text".
* :func:`adds_bos` / :func:`bos_for`: whether the tokenizer prepends BOS by default, probed by
  encoding a word with and without special tokens (as lm-evaluation-harness >= 0.4.9.2 leaves
  BOS to the tokenizer), and the BOS id blocks and windows start with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwa.data.text import (
    DEFAULT_CALIBRATION_SOURCE,
    TOY_MODEL_REFS,
    load_texts,
    parse_hf_spec,
)
from cwa.errors import DataError
from cwa.file_digest import file_sha256

_BOS_PROBE = "Hello"


def is_toy_model(model_ref: str | None) -> bool:
    return bool(model_ref) and str(model_ref).split(":")[0].lower() in TOY_MODEL_REFS


def resolve_calibration_source(source: str | None, model_ref: str | None) -> tuple[str, bool]:
    """(the source to load, whether it is the default) for ``--data`` and the model."""
    if source is not None and str(source).strip():
        return str(source).strip(), False
    return ("toy" if is_toy_model(model_ref) else DEFAULT_CALIBRATION_SOURCE), True


def load_calibration_texts(
    source: str | None, model_ref: str | None, *, text_column: str | None = None
) -> tuple[str, bool, list[str]]:
    """(resolved source, defaulted, documents); see the module docstring for the errors."""
    resolved, defaulted = resolve_calibration_source(source, model_ref)
    try:
        texts = load_texts(resolved, text_column=text_column, role="calibration")
    except DataError as exc:
        if not defaulted or resolved == "toy":
            raise
        raise DataError(
            f"no --data given, so {model_ref!r} calibrates on WikiText-2 ({resolved}), which "
            f"could not be loaded (the hub is offline or unreachable); pass --data FILE with a "
            "local .txt/.jsonl/.parquet calibration text"
        ) from exc
    return resolved, defaulted, texts


def source_match_key(kind: str, location: str, sha256: str | None = None) -> str:
    """A key equal for the same text source: content sha256 for files, the spec for hub data."""
    if kind in ("file", "toy"):
        if sha256 is None:
            sha256 = file_sha256(location)
        return f"sha256:{sha256}"
    parts = parse_hf_spec(location, with_column=True)
    spec = ":".join(str(parts[k]) for k in ("name", "config", "split", "column") if parts[k])
    return f"hf:{spec}"


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def calibration_record(
    source: str,
    defaulted: bool,
    texts: Sequence[str],
    *,
    text_column: str | None = None,
    bos: bool | None = None,
    heldout_fraction: float | None = None,
) -> dict[str, Any]:
    """What a run records about its calibration text (shown by ``cwa runs show``)."""
    record: dict[str, Any] = {"source": source, "default": defaulted, "documents": len(texts)}
    if source == "toy":
        import cwa.toy as toy

        path = Path(toy.toy_data_path("calibration"))
        record.update(kind="toy", path=str(path), sha256=file_sha256(path))
        record["match_key"] = source_match_key("toy", str(path), record["sha256"])
    elif source.startswith("hf:"):
        spec = source
        if text_column:
            parts = parse_hf_spec(source, with_column=True)
            parts["column"] = text_column
            spec = "hf:" + ":".join(
                str(parts[k]) for k in ("name", "config", "split", "column") if parts[k]
            )
        record.update(kind="hf", match_key=source_match_key("hf", spec))
    else:
        path = Path(source).expanduser().resolve()
        record.update(kind="file", path=str(path), sha256=file_sha256(path))
        record["match_key"] = source_match_key("file", str(path), record["sha256"])
    record["text_sha256"] = texts_sha256(texts)
    if text_column:
        record["text_column"] = text_column
    if bos is not None:
        record["bos"] = bos
    if heldout_fraction is not None:
        record["heldout_fraction"] = heldout_fraction
    return record


def adds_bos(tokenizer: Any) -> bool:
    """True when ``tokenizer(text)`` (default special tokens) starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tokenizer(_BOS_PROBE)["input_ids"]
    plain = tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"]
    return bool(with_specials) and with_specials[0] == bos and plain[:1] != [bos]


def bos_for(tokenizer: Any, add_bos_token: bool | None = None) -> int | None:
    """The BOS id that blocks/windows start with, or None.

    ``add_bos_token=None`` follows the tokenizer (:func:`adds_bos`); True/False override it
    (True needs a BOS token, else the EOS token stands in, as the harness's prefix token does).
    """
    if add_bos_token is False:
        return None
    if add_bos_token is None and not adds_bos(tokenizer):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise DataError("add_bos_token=True but the tokenizer has neither a BOS nor an EOS token")
    return int(bos)
