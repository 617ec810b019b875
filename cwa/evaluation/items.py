"""Reading task items (HellaSwag / LAMBADA records) from toy, local or hub sources.

Local files may be ``.jsonl`` (one JSON object per line; errors name the line), ``.json``
(a list of objects; errors name the record, counted from 1) or ``.parquet`` (rows counted
from 1). Hub sources are ``hf:NAME[:CONFIG]:SPLIT``. Every record is validated by the task's
``validate`` callback, which raises :class:`~cwa.errors.DataError` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cwa.data.text import load_hf_dataset, parse_hf_spec
from cwa.errors import DataError
from cwa.evaluation.base import SourceRef

T = TypeVar("T")

#: validate(record, where) -> item; ``where`` is e.g. "items.jsonl line 3".
Validator = Callable[[Any, str], T]


def load_items(source: SourceRef, validate: Validator[T]) -> list[T]:
    """All items of ``source``, each passed through ``validate``; never empty."""
    if source.kind == "hf":
        parts = parse_hf_spec(source.location, with_column=False)
        dataset = load_hf_dataset(str(parts["name"]), parts["config"], str(parts["split"]))
        items = [
            validate(record, f"{source.location} row {i}")
            for i, record in enumerate(dataset, start=1)
        ]
    else:
        items = _load_file_items(Path(source.location), validate)
    if not items:
        raise DataError(f"task data {source.describe()!r} contains no items")
    return items


def _load_file_items(path: Path, validate: Validator[T]) -> list[T]:
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items: list[T] = []
        for line_no, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {line_no}: invalid JSON ({exc.msg})") from exc
            items.append(validate(record, f"{path.name} line {line_no}"))
        return items
    if suffix == ".json":
        try:
            records = json.loads(_read(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
        if not isinstance(records, list):
            raise DataError(f"{path.name}: expected a JSON list of items (or use .jsonl)")
        return [validate(r, f"{path.name} item {i}") for i, r in enumerate(records, start=1)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"cannot read parquet file {str(path)!r}: {exc}") from exc
        return [validate(r, f"{path.name} row {i}") for i, r in enumerate(rows, start=1)]
    raise DataError(
        f"unsupported task file type {path.suffix or '(none)'!r} for {path.name}; "
        "use .jsonl, .json or .parquet"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read task file {str(path)!r}: {exc}") from exc


def require_fields(record: Any, where: str, fields: tuple[str, ...], task: str) -> dict[str, Any]:
    """The record as a dict, or a DataError naming the first missing field and the line."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
    for name in fields:
        if name not in record or record[name] is None:
            raise DataError(
                f"{where}: missing required field {name!r} ({task} items need: {', '.join(fields)})"
            )
    return record


def require_text(record: dict[str, Any], name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value
