import time
from decimal import Decimal

import pytest

from shared.money import PLAIN_AMOUNT, InvalidAmount, format_amount, parse_amount


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


def _taken(text: str) -> bool:
    try:
        parse_amount(text)
    except InvalidAmount:
        return False
    return True


def test_the_plain_form_the_documents_give_is_every_plain_amount_parse_amount_takes():
    """PLAIN_AMOUNT (the OpenAPI documents' pattern for an amount in a string) matches exactly
    the amounts in their plain form, digits with no zero before them and at most 2 decimals, that
    parse_amount takes: none it refuses ("0", "0.00", "12345678901", "1000000000.01"), and none
    left out, at every bound."""
    integer_parts = [*map(str, range(0, 12)), "99", "100", "999999999", "1000000000",
                     "1000000001", "1999999999", "9999999999", "10000000000", "12345678901"]
    decimals = ["", *(f".{cents}" for cents in ("0", "1", "5", "9", "00", "01", "09", "10",
                                                    "50", "99"))]
    written = [integer + decimal for integer in integer_parts for decimal in decimals]
    for text in written:
        assert (PLAIN_AMOUNT.fullmatch(text) is not None) is _taken(text), text
    for beyond_the_plain_form in ("007", "1.", ".5", "1.000", "+1", "1e2", " 1"):
        assert _taken(beyond_the_plain_form) and not PLAIN_AMOUNT.fullmatch(beyond_the_plain_form)
