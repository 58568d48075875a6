"""The read cache's format (shared/cache.py: CACHE_FORMAT) is raised with what it keeps, so that
releases that store different things never serve each other's: the fields of each answer it keeps,
and what it stores, byte for byte, for a fixed sample of each (a change to Amount's string, a
time's format, next_cursor's encoding or the entry around the answer changes no field, and each
release would serve the other's cached answers in a rolling deploy)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal

from marshmallow import Schema

from orders_app.models import Order
from orders_app.schemas import OrderPageSchema, OrderSchema
from orders_app.service import encode_cursor
from payments_app.models import Account
from payments_app.schemas import AccountSchema
from shared.cache import CACHE_FORMAT, cache_entry

# The fields of each answer the cache keeps, and their types, at each format: a change to them
# raises CACHE_FORMAT, and is written here under the new one.
CACHED_ANSWERS = {
    1: {
        "Order": {"id": "UUID", "user_id": "String", "amount": "Amount",
                  "description": "String", "status": "String", "reason": "String",
                  "created_at": "DateTime", "updated_at": "DateTime"},
        "OrderPage": {"items": "List", "next_cursor": "String"},
        "Account": {"user_id": "String", "balance": "Amount"},
    },
}

# What the cache stores for the samples below at each format, as the cache reads them from the
# database (amounts of two decimals, times in the session's time zone): a change to it raises
# CACHE_FORMAT, and is written here under the new one.
STORED = {
    1: {
        "Order": (
            '{"version": "0123456789abcdef", "value": {'
            '"id": "0f6b2c1e-8d4a-4b7e-9a35-5c2d1e0f7a86", "user_id": "usr_sample",'
            ' "amount": "30.00", "description": "Tea \\u2615,'
            ' \\u0447\\u0430\\u0439", "status": "NEW", "reason": null,'
            ' "created_at": "2026-12-01T09:30:00.250000+00:00",'
            ' "updated_at": "2026-12-01T09:30:00.250000+00:00"}}'),
        "OrderPage": (
            '{"version": "0123456789abcdef", "value": {"items": ['
            '{"id": "0f6b2c1e-8d4a-4b7e-9a35-5c2d1e0f7a86", "user_id": "usr_sample",'
            ' "amount": "30.00", "description": "Tea \\u2615, \\u0447\\u0430\\u0439",'
            ' "status": "NEW", "reason": null, "created_at": "2026-12-01T09:30:00.250000+00:00",'
            ' "updated_at": "2026-12-01T09:30:00.250000+00:00"},'
            ' {"id": "5b1f7e0c-3a2d-4e8f-9c61-0d4b2a7e9f13", "user_id": "usr_sample",'
            ' "amount": "1000000000.00", "description": "", "status": "CANCELLED",'
            ' "reason": "INSUFFICIENT_FUNDS", "created_at": "2026-11-30T23:59:59+00:00",'
            ' "updated_at": "2026-12-01T00:00:00.000001+00:00"}],'
            ' "next_cursor": "WyIyMDI2LTExLTMwVDIzOjU5OjU5KzAwOjAwIiwgIjViMWY3ZTBjLTNhMmQtNGU4Zi05'
            'YzYxLTBkNGIyYTdlOWYxMyJd"}}'),
        "Account": (
            '{"version": "0123456789abcdef", "value": {"user_id": "usr_sample",'
            ' "balance": "12.50"}}'),
    },
}

_VERSION = "0123456789abcdef"
_NEW = Order(
    id=uuid.UUID("0f6b2c1e-8d4a-4b7e-9a35-5c2d1e0f7a86"), user_id="usr_sample",
    amount=Decimal("30.00"), description="Tea \u2615, \u0447\u0430\u0439", status="NEW",
    reason=None, created_at=datetime(2026, 12, 1, 9, 30, 0, 250000, tzinfo=timezone.utc),
    updated_at=datetime(2026, 12, 1, 9, 30, 0, 250000, tzinfo=timezone.utc))
_CANCELLED = Order(
    id=uuid.UUID("5b1f7e0c-3a2d-4e8f-9c61-0d4b2a7e9f13"), user_id="usr_sample",
    amount=Decimal("1000000000.00"), description="", status="CANCELLED",
    reason="INSUFFICIENT_FUNDS", created_at=datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc),
    updated_at=datetime(2026, 12, 1, 0, 0, 0, 1, tzinfo=timezone.utc))
_ACCOUNT = Account(user_id="usr_sample", balance=Decimal("12.50"))


def _shape(schema: type[Schema]) -> dict[str, str]:
    return {name: type(field).__name__ for name, field in schema().fields.items()}


def test_a_cached_answers_shape_changes_only_with_a_new_cache_format():
    assert {"Order": _shape(OrderSchema), "OrderPage": _shape(OrderPageSchema),
            "Account": _shape(AccountSchema)} == CACHED_ANSWERS[CACHE_FORMAT], (
        "a cached answer's fields changed: raise CACHE_FORMAT (shared/cache.py) and write them "
        "under it in CACHED_ANSWERS")


def test_what_the_cache_stores_changes_only_with_a_new_cache_format():
    """The samples as the cache stores them (shared.cache.cache_entry of what orders_app's and
    payments_app's endpoints load: each schema's dump, a page's next_cursor encode_cursor's)."""
    page = {"items": [_NEW, _CANCELLED], "next_cursor": encode_cursor(_CANCELLED)}
    stored = {"Order": cache_entry(_VERSION, OrderSchema().dump(_NEW)),
              "OrderPage": cache_entry(_VERSION, OrderPageSchema().dump(page)),
              "Account": cache_entry(_VERSION, AccountSchema().dump(_ACCOUNT))}
    for answer, expected in STORED[CACHE_FORMAT].items():
        assert stored[answer] == expected, (
            f"what the cache stores for a cached {answer} changed: raise CACHE_FORMAT "
            "(shared/cache.py) and record what it stores now under it in STORED")
    assert stored.keys() == STORED[CACHE_FORMAT].keys()
