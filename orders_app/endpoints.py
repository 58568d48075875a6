"""The Orders operations as every transport serves them (HTTP routes and gRPC methods alike):
validated arguments in, the response body out. Transactions, idempotency and the read cache are
handled here once, around the use cases (a write that honours an Idempotency-Key, in the
transactions of run_idempotently)."""

from __future__ import annotations

from typing import Any

from orders_app import service
from orders_app.schemas import DEFAULT_PAGE, OrderPageSchema, OrderSchema, order_id_from_path
from shared.cache import app_cache
from shared.db import db
from shared.idempotency import run_idempotently

ORDER = OrderSchema()
ORDER_PAGE = OrderPageSchema()


def place_order(user_id: str, args: dict[str, Any], idempotency_key: str | None) -> dict:
    body, _status = run_idempotently(
        user_id=user_id, endpoint="POST /orders", key=idempotency_key, args=args,
        invalidates=service.orders_cache_namespace(user_id),
        respond=lambda session: (
            ORDER.dump(service.place_order(session, user_id=user_id, **args)), 202),
    )
    return body


def list_orders(user_id: str, args: dict[str, Any]) -> dict:
    def load():
        page = service.list_orders(db.session, user_id=user_id, **args)
        return ORDER_PAGE.dump({"items": page.items, "next_cursor": page.next_cursor})

    if args["cursor"] is not None or args["limit"] != DEFAULT_PAGE:
        # Of the pages, only the first of the default size is cached: the one read again and again
        # (the shop's page, after every change). A cursor may name any position (any time, at
        # any offset, any id), padded or not, and a size any from 1 to MAX_PAGE: keyed by them, each
        # request stored a page of its own, up to 200 orders (70 KB), some 20 MB of Redis a user
        # at the rate limit, for CACHE_TTL_SECONDS; a position decoded would not have bounded it.
        return load()
    return app_cache().read(service.orders_cache_namespace(user_id), "first-page", load)


def get_order(user_id: str, order_id: str) -> dict:
    parsed = order_id_from_path(order_id)
    return app_cache().read(
        service.orders_cache_namespace(user_id), f"order:{parsed}",
        lambda: ORDER.dump(service.get_order(db.session, user_id=user_id, order_id=parsed)))
