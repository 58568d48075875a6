import time
from decimal import Decimal

import pytest

from shared.money import InvalidAmount, format_amount, parse_amount


@pytest.mark.parametrize("given, expected", [
    ("30", Decimal("30.00")),
    ("0.01", Decimal("0.01")),
    (Decimal("12.5"), Decimal("12.50")),
    (7, Decimal("7.00")),
    (" 1.10 ", Decimal("1.10")),
    ("\t\r\n5 \n", Decimal("5.00")),  # JSON's whitespace around it
    ("1000000000.00", Decimal("1000000000.00")),
    ("1E+2", Decimal("100.00")),
])
def test_valid_amounts_become_exact_cents(given, expected):
    amount = parse_amount(given)
    assert amount == expected
    assert amount.as_tuple().exponent == -2


@pytest.mark.parametrize("given, reason", [
    ("0", "greater than 0"),
    ("-1", "greater than 0"),
    ("0.001", "2 decimal places"),
    ("30.555", "2 decimal places"),
    ("1000000000.01", "at most"),
    ("NaN", "finite"),
    ("Infinity", "finite"),
    ("-Infinity", "finite"),
    ("abc", "number"),
    ("٣", "number"),  # an Arabic-Indic three: Decimal() reads it, an amount must not
    ("５", "number"),
    ("1_000", "number"),
    # Spaces str.strip() takes, and an amount is not surrounded by: Unicode's, ASCII separators.
    ("\u00a05", "number"),
    ("5\u2003", "number"),
    ("\u30005\u3000", "number"),
    ("\x855", "number"),
    ("\x1c5\x1f", "number"),
    ("\x0b5\x0c", "number"),
    ("", "number"),
    (True, "number"),
    (None, "number"),
    (1.5, "number"),
    ([1], "number"),
    ({"amount": 1}, "number"),
])
def test_invalid_amounts_are_refused_with_a_reason(given, reason):
    with pytest.raises(InvalidAmount, match=reason):
        parse_amount(given)


@pytest.mark.parametrize("tail", ["x", "e", ".5x", "e5x", "1.5.5"])
def test_a_long_string_that_is_no_amount_is_refused_at_once(tail):
    """A run of digits is read one way only: 65,500 digits (a body within the APIs' 64 KiB) and a
    tail that makes the string no number once took a minute to refuse, holding the GIL, and so
    every thread of the server; now a few milliseconds. (The bound is a hundred times that.)"""
    text = "1" * 65_500 + tail
    started = time.process_time()
    with pytest.raises(InvalidAmount, match="number"):
        parse_amount(text)
    assert time.process_time() - started < 1.0


def test_amounts_are_written_with_exactly_two_decimals():
    assert format_amount(Decimal("70")) == "70.00"
    assert format_amount(Decimal("0.5")) == "0.50"
    assert format_amount(Decimal("1000000000.00")) == "1000000000.00"
