"""The Orders HTTP API: thin routes over the use cases, reads served through the cache."""

from __future__ import annotations

import uuid

from flask import g, jsonify

from orders_app import service
from orders_app.schemas import (ListOrdersQuerySchema, OrderPageSchema, OrderSchema,
                                PlaceOrderSchema)
from shared.cache import app_cache
from shared.db import db, transaction
from shared.errors import NotFound
from shared.http_api import Blueprint
from shared.idempotency import idempotency_key_from_request, run_idempotently

blueprint = Blueprint("orders", __name__, url_prefix="/orders", description="Place and read orders")

ORDER = OrderSchema()
ORDER_PAGE = OrderPageSchema()


@blueprint.post("")
@blueprint.arguments(PlaceOrderSchema)
@blueprint.response(202, OrderSchema)
def place_order(args):
    """Place an order; its payment is asked for asynchronously."""
    key = idempotency_key_from_request()
    with transaction() as session:
        body, status = run_idempotently(
            session, user_id=g.user_id, key=key, args=args,
            respond=lambda: (ORDER.dump(service.place_order(session, user_id=g.user_id, **args)), 202),
        )
    return jsonify(body), status


@blueprint.get("")
@blueprint.arguments(ListOrdersQuerySchema, location="query")
@blueprint.response(200, OrderPageSchema)
def list_orders(args):
    """The caller's orders, newest first."""
    def load():
        page = service.list_orders(db.session, user_id=g.user_id, **args)
        return ORDER_PAGE.dump({"items": page.items, "next_cursor": page.next_cursor})

    body = app_cache().read(service.orders_cache_namespace(g.user_id),
                            f"page:{args['limit']}:{args['cursor']}", load)
    return jsonify(body)


@blueprint.get("/<order_id>")
@blueprint.response(200, OrderSchema)
def get_order(order_id: str):
    """One of the caller's orders."""
    try:
        parsed = uuid.UUID(order_id)
    except ValueError:
        raise NotFound("No such order.", code="ORDER_NOT_FOUND") from None
    body = app_cache().read(
        service.orders_cache_namespace(g.user_id), f"order:{parsed}",
        lambda: ORDER.dump(service.get_order(db.session, user_id=g.user_id, order_id=parsed)))
    return jsonify(body)
