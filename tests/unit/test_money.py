import time
from decimal import Decimal

import pytest

from shared.jsonio import NumberBeyondDecimal, loads_strict, loads_strict_naming_repeats
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
    # Numbers past what a Decimal holds (an exponent past 10**18 either way): refused for what
    # they are, too large, not above 0 or with too many decimals, not as no number at all.
    ("1e1000000000000000000", "at most 1000000000.00"),
    ("1E+" + "9" * 5000, "at most 1000000000.00"),
    ("-1e1000000000000000000", "greater than 0"),
    ("0e1000000000000000000", "greater than 0"),
    ("-0.0e1000000000000000000", "greater than 0"),
    ("1e-1999999999999999999", "2 decimal places"),
    (NumberBeyondDecimal("1e1000000000000000000"), "at most 1000000000.00"),
    (NumberBeyondDecimal("1e-1999999999999999999"), "2 decimal places"),
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


@pytest.mark.parametrize("number, reason", [
    ("1" * 5000, "at most 1000000000.00"),
    ("-" + "1" * 5000, "greater than 0"),
    ("1e1000000000000000000", "at most 1000000000.00"),
    ("-1e1000000000000000000", "greater than 0"),
    ("1e-1999999999999999999", "2 decimal places"),
])
def test_a_request_bodys_number_past_int_or_decimal_is_read_and_refused_as_an_amount(number,
                                                                                     reason):
    """A request body is valid JSON whatever its numbers' size: an integer past the 4300 digits
    Python reads into an int (read as the Decimal it is, exactly) and an exponent past Decimal's
    range (kept as its text) were a JSONDecodeError, a 400 "not valid JSON"."""
    body, repeated = loads_strict_naming_repeats(f'{{"amount": {number}}}')
    assert repeated == []
    with pytest.raises(InvalidAmount, match=reason):
        parse_amount(body["amount"])
    # (the Kafka and database readers keep refusing them: a record's numbers are bounded)
    with pytest.raises(ValueError):
        loads_strict(f'{{"amount": {number}}}')
