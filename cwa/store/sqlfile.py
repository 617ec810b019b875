"""SQL files with named queries, and query parameters resolved like run references.

A file holds queries under ``-- name: NAME`` headers; the comment lines right after a header
describe the query, and a ``-- params: KEY=DEFAULT[, KEY=DEFAULT]`` line among them gives
defaults for ``$KEY`` parameters. A file without headers is one query. Parameters are bound by
DuckDB (``$name``), never interpolated into the SQL text. A parameter whose value is ``latest``
or ``latest:STAGE``, or whose name is ``run``/``run_id`` or ends in ``_run``/``_run_id``, is a run
reference and is resolved to a full run id the way every command resolves one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput, UnknownName

_NAME_RE = re.compile(r"^--\s*name:\s*(\S.*?)\s*$")
_PARAMS_RE = re.compile(r"^--\s*params:\s*(.*?)\s*$")
_VALID_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Things that may hide a `$word`: quoted strings, quoted identifiers and comments.
_NOT_CODE_RE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)
_PARAM_USE_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class NamedQuery:
    name: str
    description: str
    sql: str
    defaults: dict[str, str] = field(default_factory=dict)
    line: int = 1  # where its header (or the file) starts, for messages


def read_sql_source(path: str | Path) -> str:
    """The text of a SQL file (``-`` is handled by the caller, which owns stdin)."""
    file = Path(path)
    if not file.exists():
        raise InvalidInput(f"SQL file {file} does not exist; check the path")
    if not file.is_file():
        raise InvalidInput(f"{file} is not a file; --file takes a .sql file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"SQL file {file} is not UTF-8 text") from exc


def _parse_defaults(text: str, where: str) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"{where}: '-- params:' takes KEY=DEFAULT items, got {item!r}")
        defaults[key.strip()] = value.strip()
    return defaults


def parse_named_queries(text: str, source: str = "SQL") -> list[NamedQuery]:
    """Split ``text`` into its named queries, in file order (empty if it has no headers)."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if _NAME_RE.match(line.strip())]
    queries: list[NamedQuery] = []
    seen: set[str] = set()
    for n, start in enumerate(headers):
        end = headers[n + 1] if n + 1 < len(headers) else len(lines)
        name = _NAME_RE.match(lines[start].strip()).group(1)  # type: ignore[union-attr]
        where = f"{source} line {start + 1}"
        if not _VALID_NAME_RE.match(name):
            raise InvalidInput(f"{where}: query name {name!r} must be letters, digits, _ or -")
        if name in seen:
            raise InvalidInput(f"{where}: query name {name!r} is used twice; rename one")
        seen.add(name)
        description: list[str] = []
        defaults: dict[str, str] = {}
        body_start = start + 1
        # The comment block right after the header describes the query.
        while body_start < end and lines[body_start].strip().startswith("--"):
            comment = lines[body_start].strip()
            params = _PARAMS_RE.match(comment)
            if params:
                defaults.update(_parse_defaults(params.group(1), where))
            else:
                description.append(comment[2:].strip())
            body_start += 1
        body = "\n".join(lines[body_start:end]).strip()
        if not body:
            raise InvalidInput(f"{where}: query {name!r} has no SQL under its header")
        queries.append(
            NamedQuery(name, " ".join(d for d in description if d), body, defaults, start + 1)
        )
    return queries


def select_query(text: str, name: str | None, source: str = "SQL") -> NamedQuery:
    """The query to run from a file's text: the one called ``name``, or the file as one query."""
    queries = parse_named_queries(text, source)
    if name is not None:
        if not queries:
            raise InvalidInput(
                f"{source} has no '-- name: ...' headers, so --name {name!r} cannot pick a query; "
                "run the whole file without --name"
            )
        by_name = {q.name: q for q in queries}
        if name not in by_name:
            import difflib

            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownName(
                f"no query named {name!r} in {source}; {hint}available: {', '.join(by_name)} "
                "(see --list)"
            )
        return by_name[name]
    if len(queries) > 1:
        raise InvalidInput(
            f"{source} holds {len(queries)} named queries; pick one with --name "
            f"(e.g. --name {queries[0].name}) or see them with --list"
        )
    if queries:
        return queries[0]
    return NamedQuery("", "", text.strip())


def used_parameters(sql: str) -> list[str]:
    """Names of the ``$name`` parameters a query uses (ignoring strings and comments)."""
    code = _NOT_CODE_RE.sub(" ", sql)
    return list(dict.fromkeys(_PARAM_USE_RE.findall(code)))


def parse_param_options(items: list[str]) -> dict[str, str]:
    """``["run=latest:perturb", "k=100"]`` -> dict; each item must be KEY=VALUE."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"--param {item!r} must be KEY=VALUE, e.g. --param run=latest")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise InvalidInput(f"--param name {key!r} must be letters, digits and _")
        out[key] = value
    return out


def is_run_reference(name: str, value: str) -> bool:
    lowered = name.lower()
    return (
        value == "latest"
        or value.startswith("latest:")
        or lowered in ("run", "run_id")
        or lowered.endswith(("_run", "_run_id"))
    )


def _typed(value: str) -> Any:
    # Numbers bind as numbers so that `rank <= $k` compares numerically.
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def bind_parameters(
    sql: str,
    given: dict[str, str],
    defaults: dict[str, str],
    resolve_run: Any,
) -> dict[str, Any]:
    """The parameter values for ``sql``: given ones over defaults, run references resolved.

    ``resolve_run(ref) -> run_id`` is called for run references (it needs the store).
    """
    used = used_parameters(sql)
    unused = [k for k in given if k not in used]
    if unused:
        what = f"it uses {', '.join('$' + u for u in used)}" if used else "it has no parameters"
        raise InvalidInput(f"--param {unused[0]} is not used by this query ({what})")
    values: dict[str, Any] = {}
    for name in used:
        if name in given:
            raw = given[name]
        elif name in defaults:
            raw = defaults[name]
        else:
            raise InvalidInput(f"the query uses ${name}; pass --param {name}=VALUE")
        values[name] = resolve_run(raw) if is_run_reference(name, raw) else _typed(raw)
    return values
