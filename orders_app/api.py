"""The Orders HTTP API: routes that parse the request and call the shared endpoint operations."""

from __future__ import annotations

from flask import g, jsonify

from orders_app import endpoints
from orders_app.schemas import (GET_ORDER_ERRORS, LIST_ORDERS_ERRORS, ORDER_PAGE_LINKS,
                                PLACE_ORDER_ERRORS, PLACED_ORDER_LINKS, ListOrdersQuerySchema,
                                OrderPageSchema, OrderSchema, PlaceOrderSchema)
from shared.caller_deadline import CALLER_GAVE_UP, DEADLINE_PARAMETER
from shared.documented_errors import SERVICE_OPERATION_ERRORS, SIGNATURE_USED
from shared.http_api import Blueprint
from shared.idempotency import (IDEMPOTENCY_KEY_PARAMETER, REPLAYED_RESPONSE_HEADERS,
                                idempotency_key_from_request)

blueprint = Blueprint("orders", __name__, url_prefix="/orders", description="Place and read orders",
                      errors=SERVICE_OPERATION_ERRORS)


@blueprint.post("")
@blueprint.arguments(PlaceOrderSchema)
@blueprint.doc(parameters=[IDEMPOTENCY_KEY_PARAMETER, DEADLINE_PARAMETER])
@blueprint.response(202, OrderSchema, headers=REPLAYED_RESPONSE_HEADERS,
                    links=PLACED_ORDER_LINKS)
@blueprint.errors(*PLACE_ORDER_ERRORS, CALLER_GAVE_UP, SIGNATURE_USED)
def place_order(args):
    """Place an order; its payment is asked for asynchronously."""
    return jsonify(endpoints.place_order(g.user_id, args, idempotency_key_from_request())), 202


@blueprint.get("")
@blueprint.arguments(ListOrdersQuerySchema, location="query")
@blueprint.doc(parameters=[DEADLINE_PARAMETER])
@blueprint.response(200, OrderPageSchema, links=ORDER_PAGE_LINKS)
@blueprint.errors(*LIST_ORDERS_ERRORS)
def list_orders(args):
    """The caller's orders, newest first."""
    return jsonify(endpoints.list_orders(g.user_id, args))


@blueprint.get("/<any_text:order_id>")  # (shared.path_parameters)
@blueprint.doc(parameters=[DEADLINE_PARAMETER])
@blueprint.response(200, OrderSchema)
@blueprint.errors(*GET_ORDER_ERRORS)
def get_order(order_id: str):
    """One of the caller's orders."""
    return jsonify(endpoints.get_order(g.user_id, order_id))
