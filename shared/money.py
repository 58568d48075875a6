"""Money: parsing untrusted amounts into exact `Decimal`s with two places, and formatting them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from shared.jsonio import NumberBeyondDecimal

CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("1000000000.00")
MAX_BALANCE = Decimal("999999999999999.99")


# What a numeric string may look like: ASCII digits only (Decimal() would also take "٣" or "1_000"),
# an optional sign, point and exponent; or NaN or Infinity, refused below as not finite. Written
# so that a run of digits can be read one way only: with `\d+\.?\d*` a long run followed by a
# character that fails the match was tried split at every place (65,500 digits then an "x", a body
# within the 64 KiB limit, held a server's every thread for a minute: the match keeps the GIL).
_NUMERIC_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
                           r"|[+-]?(?:nan|inf|infinity)", re.ASCII | re.IGNORECASE)


# What may surround an amount in a string: JSON's own whitespace (space, tab, CR, LF). Not
# str.strip()'s, which takes every Unicode space (a no-break space, an ideographic one) and the
# ASCII separators \x1c-\x1f too: an amount is a string in ASCII.
_SURROUNDING_SPACE = " \t\r\n"


# An amount parse_amount takes, as the OpenAPI documents give it (shared.fields.Amount): ASCII
# digits with no zero before them, at most 2 decimals, above 0 and at most MAX_AMOUNT (written out
# for that maximum, as JSON Schema cannot compare a string's value: tests/unit/test_money.py holds
# the two together), in a regular expression any client's engine reads as ours does.
PLAIN_AMOUNT = re.compile(r"(?:[1-9][0-9]{0,8}(?:\.[0-9]{1,2})?|0\.(?:0[1-9]|[1-9][0-9]?)"
                          r"|1000000000(?:\.00?)?)")


class InvalidAmount(ValueError):
    """The value is not an acceptable amount; the message says why."""


def parse_amount(value: object) -> Decimal:
    """An amount from a JSON number or string: above 0, at most 2 decimals, at most MAX_AMOUNT."""
    if isinstance(value, NumberBeyondDecimal):
        value = value.text  # (a JSON number, read as its text: refused below, saying why)
    elif isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        # Floats never get here from our JSON decoder (it yields Decimal); refuse them if they do,
        # so binary rounding can never leak into money.
        raise InvalidAmount("must be a number or a numeric string")
    text = value.strip(_SURROUNDING_SPACE) if isinstance(value, str) else value
    if isinstance(text, str) and not _NUMERIC_TEXT.fullmatch(text):
        raise InvalidAmount("must be a number or a numeric string")
    try:
        amount = Decimal(text)
    except (InvalidOperation, ValueError):
        raise InvalidAmount(_beyond_decimal(text)) from None
    if not amount.is_finite():
        raise InvalidAmount("must be a finite number")
    if amount <= 0:
        raise InvalidAmount("must be greater than 0")
    if amount > MAX_AMOUNT:
        raise InvalidAmount(f"must be at most {MAX_AMOUNT}")
    cents = amount.quantize(CENT)
    if cents != amount:
        raise InvalidAmount("must have at most 2 decimal places")
    return cents


def _beyond_decimal(text: str) -> str:
    """Why a number Decimal cannot hold is no amount: `text` is one (_NUMERIC_TEXT's, of far
    fewer than 10**18 digits) whose exponent is past 10**18 either way, so it is 0, below 0, far
    past MAX_AMOUNT or far below a cent. Read from its text: its exponent may have thousands of
    digits, past what int() reads."""
    mantissa, _, exponent = text.lower().partition("e")
    if not mantissa.strip("+-.0") or mantissa.startswith("-"):
        return "must be greater than 0"
    if exponent.startswith("-"):
        return "must have at most 2 decimal places"
    return f"must be at most {MAX_AMOUNT}"


def format_amount(amount: Decimal) -> str:
    """The wire form of an amount: a string with exactly two decimals."""
    return str(Decimal(amount).quantize(CENT))
