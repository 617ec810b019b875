"""Calibration and evaluation text: loading documents and cutting them into token blocks.

Sources (the ``--data`` value):

* ``toy`` -- the built-in toy corpus: ``role="calibration"`` reads the toy calibration file,
  ``role="heldout"`` the toy held-out file (two files generated from different seeds).
* a local ``.txt`` file -- one document per line; if the file contains blank lines, documents
  are instead the blank-line separated paragraphs (their inner line breaks kept).
* a local ``.jsonl`` file (one JSON object per line) or ``.parquet`` file, the text being the
  ``text_column`` (default ``"text"``); a missing column is an error that lists the columns.
* ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` -- a Hugging Face hub dataset loaded with ``datasets``,
  used only where the hub (or the local datasets cache) answers; otherwise a one-line
  :class:`~cwa.errors.DataError` says so and suggests a local file.

A missing file, an unreadable file or a file without any text is a :class:`DataError`: there
is never a silent fallback to other text.

Token blocks (:func:`token_blocks`): the documents are tokenized without special tokens and
concatenated into one stream, with the tokenizer's EOS token between documents (when it has
one). The stream is split at token ``cut = floor(len * (1 - heldout_fraction))``: calibration
blocks come only from ``stream[:cut]`` and held-out blocks only from ``stream[cut:]``, so a
held-out (evaluation) block never contains a token of the calibration text, unless
``allow_overlap=True`` asks for both roles to draw from the whole stream. Each part is cut
into non-overlapping blocks of ``seq_len`` tokens (a final partial block is dropped);
``n_samples`` of them are drawn without replacement by a ``torch.Generator`` seeded with
``seed`` -- the first ``n`` of a permutation, so a smaller ``n_samples`` with the same seed
is a prefix of a larger one. ``n_samples=None`` takes every block, in stream order.

BOS (:func:`adds_bos`, :func:`bos_for`): when the tokenizer prepends a BOS token by default
(Llama/Gemma-style tokenizers), every block starts with that BOS followed by ``seq_len - 1``
stream tokens, as lm-evaluation-harness's rolling log-likelihood conditions its first window
on the prefix token. The BOS is context only: the loss's targets are positions 1.., so it is
never predicted. Tokenizers that add no BOS (GPT-2) get plain ``seq_len``-token blocks.

Default source (:func:`resolve_calibration_source`): the toy text only for the toy models;
any other model defaults to WikiText-2 raw train (:data:`DEFAULT_CALIBRATION_SOURCE`), and if
that cannot be loaded the error says to pass ``--data FILE``. :func:`calibration_record`
describes the resolved source for the run record (file sha256, text sha256).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import DataError, InvalidInput

if TYPE_CHECKING:
    import torch

ROLES = ("calibration", "heldout")
DEFAULT_TEXT_COLUMN = "text"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_LOCAL_FILE_HINT = "pass a local .txt/.jsonl/.parquet file instead (e.g. --data notes.txt)"
#: Calibration text of every non-toy model unless --data says otherwise (the common choice in
#: the pruning literature: SparseGPT, Wanda and the super-weight paper calibrate on it).
DEFAULT_CALIBRATION_SOURCE = "hf:wikitext:wikitext-2-raw-v1:train:text"
TOY_MODEL_REFS = ("toy", "toy-gpt2", "toy-llama")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidInput(f"unknown data role {role!r}; use one of: {', '.join(ROLES)}")


# -- loading ------------------------------------------------------------------------------


def load_texts(
    source: str, *, text_column: str | None = None, role: str = "calibration"
) -> list[str]:
    """Load the documents named by ``source`` (see the module docstring) as a list of strings.

    ``role`` only matters for ``toy``, which has separate calibration and held-out files;
    other sources return the same documents for both roles and :func:`token_blocks` keeps
    the roles apart. Raises :class:`DataError` for a missing, unreadable or empty source.
    """
    _check_role(role)
    if not isinstance(source, str) or not source.strip():
        raise DataError("empty data source; pass 'toy', a local file path or 'hf:NAME:SPLIT:COL'")
    source = source.strip()
    if source == "toy":
        return _load_toy(role)
    if source.startswith("hf:"):
        return load_hf_texts(source, text_column=text_column)
    return load_text_file(source, text_column=text_column)


def _load_toy(role: str) -> list[str]:
    # Looked up at call time: the toy module builds its corpus on first use.
    import cwa.toy as toy

    path = toy.toy_data_path("calibration" if role == "calibration" else "heldout")
    return load_text_file(path)


def load_text_file(path: str | os.PathLike[str], *, text_column: str | None = None) -> list[str]:
    """Read the documents of a local ``.txt``, ``.jsonl`` or ``.parquet`` file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data file {str(file)!r} does not exist; check the path")
    if not file.is_file():
        raise DataError(f"data path {str(file)!r} is not a file; pass a .txt/.jsonl/.parquet file")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        if text_column is not None:
            raise InvalidInput(f"--text-column does not apply to a .txt file ({file.name})")
        texts = _read_txt(file)
    elif suffix == ".jsonl":
        texts = _read_jsonl(file, text_column or DEFAULT_TEXT_COLUMN)
    elif suffix == ".parquet":
        texts = _read_parquet(file, text_column or DEFAULT_TEXT_COLUMN)
    else:
        raise DataError(
            f"unsupported data file type {file.suffix or '(none)'!r} for {file.name}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not texts:
        raise DataError(f"data file {str(file)!r} contains no text; give a file with documents")
    return texts


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(file)!r} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {str(file)!r}: {exc.strerror}") from exc


def split_txt_documents(content: str) -> list[str]:
    """Documents of a .txt file: blank-line separated paragraphs if any, else lines."""
    lines = content.splitlines()
    stripped = [line.strip() for line in lines]
    filled = [i for i, s in enumerate(stripped) if s]
    # Paragraph mode only when a blank line sits between two non-empty lines.
    has_blank_separator = bool(filled) and any(
        not stripped[i] for i in range(filled[0], filled[-1])
    )
    if not has_blank_separator:
        return [s for s in stripped if s]
    paragraphs: list[str] = []
    current: list[str] = []
    for line, s in zip(lines, stripped, strict=True):
        if s:
            current.append(line.rstrip())
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return [p for p in paragraphs if p]


def _read_txt(file: Path) -> list[str]:
    return split_txt_documents(_read_text(file))


def _column_error(where: str, column: str, available: Sequence[str]) -> DataError:
    cols = ", ".join(repr(c) for c in available) or "(none)"
    return DataError(
        f"{where} has no column {column!r}; available columns: {cols} (choose one with "
        "--text-column)"
    )


def _read_jsonl(file: Path, column: str) -> list[str]:
    texts: list[str] = []
    for line_no, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file.name} line {line_no}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{file.name} line {line_no}: expected a JSON object per line")
        if column not in record:
            raise _column_error(f"{file.name} line {line_no}", column, list(record))
        value = record[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{file.name} line {line_no}: column {column!r} is {type(value).__name__}, "
                "not text; choose a text column with --text-column"
            )
        if value.strip():
            texts.append(value)
    return texts


def _read_parquet(file: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read parquet file {str(file)!r}: {exc}") from exc
    if column not in schema.names:
        raise _column_error(file.name, column, schema.names)
    values = pq.read_table(file, columns=[column]).column(column).to_pylist()
    return _texts_from_values(values, f"{file.name} column {column!r}")


def _texts_from_values(values: Sequence[Any], where: str) -> list[str]:
    texts: list[str] = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{where} holds {type(value).__name__} values, not text; choose a text column"
            )
        if value.strip():
            texts.append(value)
    return texts


def parse_hf_spec(spec: str, *, with_column: bool = True) -> dict[str, str | None]:
    """Split ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` into its parts (``config`` may be None)."""
    body = spec[3:] if spec.startswith("hf:") else spec
    parts = body.split(":")
    form = "hf:NAME[:CONFIG]:SPLIT" + (":COLUMN" if with_column else "")
    n_fixed = 3 if with_column else 2
    if len(parts) not in (n_fixed, n_fixed + 1) or any(not p for p in parts):
        raise DataError(f"malformed hub dataset spec {spec!r}; expected {form}")
    name = parts[0]
    config = parts[1] if len(parts) == n_fixed + 1 else None
    rest = parts[-(n_fixed - 1) :]
    return {
        "name": name,
        "config": config,
        "split": rest[0],
        "column": rest[1] if with_column else None,
    }


def load_hf_dataset(name: str, config: str | None, split: str) -> Any:
    """Load one split of a hub dataset, turning every failure into a one-line DataError."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(
            f"the 'datasets' package is needed for hub data; {_LOCAL_FILE_HINT}"
        ) from exc
    label = ":".join(p for p in (name, config, split) if p)
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or bool(
        getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    )
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets/hub raise many types (connection, not found, ...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        state = (
            "the hub is offline (HF_HUB_OFFLINE) and it is not in the local cache"
            if offline
            else "the hub is unreachable or the dataset does not exist"
        )
        raise DataError(
            f"cannot load hub dataset {label!r}: {state} ({type(exc).__name__}: {first_line}); "
            f"{_LOCAL_FILE_HINT}"
        ) from exc


def load_hf_texts(spec: str, *, text_column: str | None = None) -> list[str]:
    """Documents of ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` (``text_column`` overrides COLUMN)."""
    parts = parse_hf_spec(spec, with_column=True)
    column = text_column or parts["column"]
    assert column is not None
    dataset = load_hf_dataset(str(parts["name"]), parts["config"], str(parts["split"]))
    names = list(getattr(dataset, "column_names", []) or [])
    if column not in names:
        raise _column_error(f"hub dataset {spec!r}", column, names)
    texts = _texts_from_values(dataset[column], f"hub dataset {spec!r} column {column!r}")
    if not texts:
        raise DataError(f"hub dataset {spec!r} column {column!r} contains no text")
    return texts


# -- token blocks ----------------------------------------------------------------------------


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All documents tokenized without special tokens, EOS-separated, as one 1-D long tensor."""
    import torch

    if not texts:
        raise DataError("no documents to tokenize; the data source is empty")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces: list[int] = []
    for i, ids in enumerate(encoded):
        if i and eos is not None:
            pieces.append(int(eos))
        pieces.extend(ids)
    return torch.tensor(pieces, dtype=torch.long)


def split_bounds(
    n_tokens: int, *, role: str, heldout_fraction: float, allow_overlap: bool
) -> tuple[int, int]:
    """The [start, stop) token range of ``role`` in a stream of ``n_tokens`` tokens."""
    _check_role(role)
    if not (0.0 < heldout_fraction <= 1.0) or math.isnan(heldout_fraction):
        raise InvalidInput(f"heldout_fraction must be in (0, 1], got {heldout_fraction}; e.g. 0.1")
    if allow_overlap:
        return 0, n_tokens
    cut = math.floor(n_tokens * (1.0 - heldout_fraction))
    if role == "calibration":
        if heldout_fraction >= 1.0:
            raise InvalidInput(
                "heldout_fraction=1 leaves no calibration text; use a smaller fraction"
            )
        return 0, cut
    return cut, n_tokens


def token_blocks(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int,
    n_samples: int | None,
    seed: int,
    role: str = "calibration",
    heldout_fraction: float = 0.1,
    allow_overlap: bool = False,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Blocks of ``seq_len`` tokens for ``role``, shape ``[n, seq_len]`` (long).

    See the module docstring for the stream, the calibration/held-out split and the seeded
    draw. With ``bos_token_id`` every block is that token followed by ``seq_len - 1`` stream
    tokens (context only; see the module docstring). Raises :class:`DataError` when the text
    is too short for the requested blocks.
    """
    import torch

    if seq_len < 2:
        raise InvalidInput(f"seq_len must be at least 2, got {seq_len}")
    if bos_token_id is not None:
        if seq_len < 3:
            raise InvalidInput(
                f"seq_len must be at least 3 when blocks start with BOS, got {seq_len}"
            )
        body = token_blocks(
            tokenizer,
            texts,
            seq_len=seq_len - 1,
            n_samples=n_samples,
            seed=seed,
            role=role,
            heldout_fraction=heldout_fraction,
            allow_overlap=allow_overlap,
        )
        bos = torch.full((body.shape[0], 1), int(bos_token_id), dtype=torch.long)
        return torch.cat([bos, body], dim=1)
    if n_samples is not None and n_samples < 1:
        raise InvalidInput(f"n_samples must be at least 1, got {n_samples}")
    stream = token_stream(tokenizer, texts)
    start, stop = split_bounds(
        int(stream.numel()),
        role=role,
        heldout_fraction=heldout_fraction,
        allow_overlap=allow_overlap,
    )
    part = stream[start:stop]
    n_blocks = int(part.numel()) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the {role} text has {part.numel()} tokens, fewer than one block of "
            f"seq_len={seq_len}; use a smaller --seq-len or more text"
        )
    blocks = part[: n_blocks * seq_len].view(n_blocks, seq_len)
    if n_samples is None:
        return blocks.clone()
    if n_samples > n_blocks:
        raise DataError(
            f"asked for {n_samples} blocks of {seq_len} tokens but the {role} text only has "
            f"{n_blocks}; lower --n-samples or --seq-len, or give more text"
        )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n_blocks, generator=generator)[:n_samples]
    return blocks[order].clone()


def batches_from_blocks(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of ``blocks`` with an all-ones attention mask (no padding)."""
    import torch

    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    if blocks.dim() != 2:
        raise InvalidInput(
            f"blocks must be a 2-D [n, seq_len] tensor, got shape {tuple(blocks.shape)}"
        )
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in torch.split(blocks, batch_size)
    ]
