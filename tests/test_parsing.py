from __future__ import annotations

import pytest

from cwa.errors import InvalidInput
from cwa.parsing import parse_float_list, parse_int_list, parse_name_list, parse_seeds


def test_int_lists() -> None:
    assert parse_int_list("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_int_list("5,1,5") == [1, 5]
    assert parse_int_list(None) is None and parse_int_list(" ") is None
    with pytest.raises(InvalidInput, match="reversed"):
        parse_int_list("5-1")
    with pytest.raises(InvalidInput, match="cannot read"):
        parse_int_list("a-b", what="layer")


def test_names_floats_seeds() -> None:
    assert parse_name_list("attn_q, mlp_down,,attn_q") == ["attn_q", "mlp_down"]
    assert parse_float_list("0.5,1,2") == [0.5, 1.0, 2.0]
    with pytest.raises(InvalidInput):
        parse_float_list("1,x")
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None, 3) == [3]


def test_parse_percent_reads_decimal_text_exactly_and_checks_the_range() -> None:
    from fractions import Fraction

    from cwa.parsing import parse_percent

    assert parse_percent("50%") == 50
    assert parse_percent(" 0.1% ") == Fraction(1, 10)  # exact, not the float 0.1
    assert parse_percent("100%") == 100
    for bad in ("0%", "-5%", "100.5%", "abc%", "%", "inf%"):
        with pytest.raises(InvalidInput, match="percentage"):
            parse_percent(bad)
