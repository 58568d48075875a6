"""An orders cursor (orders_app.service: decode_cursor) is taken in the form a page's next_cursor
has (encode_cursor) and no other: base64url, padded or not, of the JSON json.dumps writes of
[the time as isoformat() writes it, the id as str(UUID) does]; anything else is 400
INVALID_CURSOR."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from orders_app.models import Order
from orders_app.service import decode_cursor, encode_cursor
from shared.errors import ApiError

ORDER_ID = "5b1f7e0c-3a2d-4e8f-9c61-0d4b2a7e9f13"
TIME = "2026-12-01T09:30:00.250000+00:00"
AT = (datetime(2026, 12, 1, 9, 30, 0, 250000, tzinfo=timezone.utc), uuid.UUID(ORDER_ID))


def _base64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_of(*position) -> str:
    return _base64url(json.dumps(list(position)).encode())


@pytest.mark.parametrize("created_at", [
    datetime(2026, 12, 1, 9, 30, 0, 250000, tzinfo=timezone.utc),
    datetime(2026, 12, 1, 9, 30, 0, tzinfo=timezone.utc),  # (isoformat() writes no decimals)
    datetime(2026, 12, 1, 9, 30, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
    datetime(2026, 12, 1, 9, 30, 0, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    # (an offset with seconds, as a database session's time zone gives for old dates)
    datetime(1900, 1, 1, 0, 0, 0, tzinfo=timezone(timedelta(hours=2, minutes=30, seconds=17))),
], ids=["utc", "whole-second", "behind-utc", "half-hour-offset", "offset-with-seconds"])
def test_a_next_cursor_names_the_position_of_the_order_it_was_made_after(created_at):
    order = Order(id=uuid.uuid4(), created_at=created_at)
    cursor = encode_cursor(order)
    expected = (created_at.astimezone(timezone.utc), order.id)
    assert decode_cursor(cursor) == expected
    assert decode_cursor(cursor + "=" * (-len(cursor) % 4)) == expected  # padded


def test_a_cursor_of_the_form_every_release_has_given_out_is_still_taken():
    """A next_cursor as every release so far has written it (handed out by the release before
    in a rolling deploy, or cached in a first page it stored)."""
    given = ("WyIyMDI2LTEyLTAxVDA5OjMwOjAwLjI1MDAwMCswMDowMCIsICI1YjFmN2UwYy0zYTJkLTRlOGYtOWM2MS0w"
             "ZDRiMmE3ZTlmMTMiXQ")
    assert decode_cursor(given) == AT
    assert encode_cursor(Order(id=AT[1], created_at=AT[0])) == given


REFUSED = {
    # JSON of another shape
    "object": _base64url(json.dumps({TIME: ORDER_ID}).encode()),
    "object-of-the-two-as-keys": _base64url(json.dumps({TIME: 1, ORDER_ID: 2}).encode()),
    "one": _cursor_of(TIME),
    "three": _cursor_of(TIME, ORDER_ID, ORDER_ID),
    "id-a-number": _cursor_of(TIME, 7),
    "time-a-list": _cursor_of([TIME], ORDER_ID),
    # JSON written otherwise
    "utf-16": _base64url(json.dumps([TIME, ORDER_ID]).encode("utf-16")),
    "utf-16-le": _base64url(json.dumps([TIME, ORDER_ID]).encode("utf-16-le")),
    "bom": _base64url(b"\xef\xbb\xbf" + json.dumps([TIME, ORDER_ID]).encode()),
    "compact": _base64url(json.dumps([TIME, ORDER_ID], separators=(",", ":")).encode()),
    "trailing-space": _base64url(json.dumps([TIME, ORDER_ID]).encode() + b" "),
    "two-spaces": _base64url(
        b"[" + json.dumps(TIME).encode() + b",  " + json.dumps(ORDER_ID).encode() + b"]"),
    "escaped-digit": _base64url(
        json.dumps([TIME, ORDER_ID]).replace("2026", "\\u0032026", 1).encode()),
    # a time not as isoformat() writes it
    "nul-before-offset": _cursor_of("2026-12-01T09:30:00\u0000+00:00", ORDER_ID),
    "nul-for-t": _cursor_of("2026-12-01\u000009:30:00+00:00", ORDER_ID),
    "seven-decimals": _cursor_of("2026-12-01T09:30:00.2500001+00:00", ORDER_ID),
    "two-decimals": _cursor_of("2026-12-01T09:30:00.25+00:00", ORDER_ID),
    "zero-decimals": _cursor_of("2026-12-01T09:30:00.000000+00:00", ORDER_ID),
    "week-date": _cursor_of("2026-W49-2T09:30:00+00:00", ORDER_ID),
    "ordinal-date": _cursor_of("2026-335T09:30:00+00:00", ORDER_ID),
    "basic-format": _cursor_of("20261201T093000+0000", ORDER_ID),
    "z": _cursor_of("2026-12-01T09:30:00Z", ORDER_ID),
    "minus-zero": _cursor_of("2026-12-01T09:30:00-00:00", ORDER_ID),
    "space-for-t": _cursor_of("2026-12-01 09:30:00+00:00", ORDER_ID),
    "no-seconds": _cursor_of("2026-12-01T09:30+00:00", ORDER_ID),
    "naive": _cursor_of("2026-12-01T09:30:00", ORDER_ID),
    # an id not as str(UUID) writes it
    "id-upper-case": _cursor_of(TIME, ORDER_ID.upper()),
    "id-without-hyphens": _cursor_of(TIME, ORDER_ID.replace("-", "")),
    "id-in-braces": _cursor_of(TIME, "{" + ORDER_ID + "}"),
    "id-as-urn": _cursor_of(TIME, "urn:uuid:" + ORDER_ID),
    # no position
    "not-json": "bm9wZQ", "None": "None", "As": "A" * 500,
}


@pytest.mark.parametrize("cursor", REFUSED.values(), ids=REFUSED.keys())
def test_a_cursor_of_any_other_form_is_refused(cursor):
    with pytest.raises(ApiError) as refused:
        decode_cursor(cursor)
    assert (refused.value.status, refused.value.code) == (400, "INVALID_CURSOR")
