"""Parsing of the list-valued options stages share ("0-5,8", "attn_q,mlp_down", "0.5,1,2")."""

from __future__ import annotations

from fractions import Fraction

from cwa.errors import InvalidInput


def parse_int_list(text: str | None, *, what: str = "value") -> list[int] | None:
    """'0-3,7' -> [0, 1, 2, 3, 7]; None or '' -> None (meaning: all)."""
    if text is None or not text.strip():
        return None
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo_text, hi_text = part.split("-", 1) if part[0] != "-" else (part, "")
                lo, hi = int(lo_text), int(hi_text)
                if hi < lo:
                    raise InvalidInput(f"{what} range {part!r} is reversed; write it as {hi}-{lo}")
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
        except ValueError as exc:
            raise InvalidInput(
                f"cannot read {what} {part!r}; use integers and ranges like '0-5,8'"
            ) from exc
    if any(v < 0 for v in values):
        raise InvalidInput(f"{what}s must be non-negative, got {text!r}")
    return sorted(set(values))


def parse_name_list(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c'] (order kept, duplicates dropped); None/'' -> None."""
    if text is None or not text.strip():
        return None
    seen: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in seen:
            seen.append(part)
    return seen or None


def parse_float_list(text: str | None, *, what: str = "value") -> list[float] | None:
    if text is None or not text.strip():
        return None
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise InvalidInput(f"cannot read {what}s {text!r}; use numbers like '0.5,1,2'") from exc


def parse_seeds(text: str | None, default: int = 0) -> list[int]:
    """'0,1,2' or '0-4' -> seeds; None -> [default]."""
    seeds = parse_int_list(text, what="seed")
    return seeds if seeds else [default]


def parse_percent(text: str) -> Fraction:
    """``"50%"`` -> 50, exactly (the decimal text read as a fraction), checked to be in (0, 100].

    The one reading of a percentage k (``--topk 50%``, ``--k-values 10%``); the caller checks
    that the text ends with ``%``.
    """
    value = str(text).strip()
    try:
        percent = Fraction(value.removesuffix("%"))
    except (ValueError, ZeroDivisionError) as exc:
        raise InvalidInput(f"k {text!r} is not a percentage; write e.g. 10%") from exc
    if not 0 < percent <= 100:
        raise InvalidInput(f"k {text!r} must be a percentage in (0, 100], e.g. 10%")
    return percent
