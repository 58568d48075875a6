"""The read cache's format (shared/cache.py: CACHE_FORMAT) is raised with the shape of the answers
it keeps, so that releases of different shapes never serve each other's."""

from __future__ import annotations

from marshmallow import Schema

from orders_app.schemas import OrderPageSchema, OrderSchema
from payments_app.schemas import AccountSchema
from shared.cache import CACHE_FORMAT

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


def _shape(schema: type[Schema]) -> dict[str, str]:
    return {name: type(field).__name__ for name, field in schema().fields.items()}


def test_a_cached_answers_shape_changes_only_with_a_new_cache_format():
    assert {"Order": _shape(OrderSchema), "OrderPage": _shape(OrderPageSchema),
            "Account": _shape(AccountSchema)} == CACHED_ANSWERS[CACHE_FORMAT], (
        "a cached answer's fields changed: raise CACHE_FORMAT (shared/cache.py) and write them "
        "under it in CACHED_ANSWERS")
