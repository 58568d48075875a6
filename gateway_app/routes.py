"""The public shop API under /api. Each route checks its input with the owning service's schemas,
then reaches that service over gRPC (or over HTTP, when GATEWAY_UPSTREAM_TRANSPORT=http) and
answers exactly as the service's own HTTP API would."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, jsonify, make_response, request, url_for

from gateway_app import upstream_grpc
from gateway_app.auth import SIGNED_IN_ERRORS
from gateway_app.proxy import forward
from gateway_app.resends import safe_to_send_again, sent_again_under_its_key
from orders_app.schemas import (GET_ORDER_ERRORS, LIST_ORDERS_ERRORS, ORDER_PAGE_LINKS,
                                PLACE_ORDER_ERRORS, PLACED_ORDER_LINKS, ListOrdersQuerySchema,
                                OrderPageSchema, OrderSchema, PlaceOrderSchema,
                                order_id_from_path)
from payments_app.schemas import (BALANCE_ERRORS, DEPOSIT_ERRORS, OPEN_ACCOUNT_ERRORS,
                                  OPENED_ACCOUNT_LINKS, AccountSchema, DepositSchema)
from shared.documented_errors import (BAD_GATEWAY, DATABASE_UNAVAILABLE_OR_BUSY,
                                      SERVICE_UNAVAILABLE, UPSTREAM_ROLLED_BACK,
                                      UPSTREAM_TIMEOUT)
from shared.http_api import Blueprint, EmptySchema
from shared.idempotency import (IDEMPOTENCY_KEY_PARAMETER, REPLAYED_RESPONSE_HEADERS,
                                idempotency_key_from_request)
from shared.money import format_amount

# What a call to a service can end in, over either transport: the service failing, unreachable
# or too slow, or its own 503 passed on. (Its other errors are passed on as they are if the route
# declares their code under their status, but a 401, which the gateway's signed identity was
# refused with; any other is a 502: gateway_app/upstream_answers.py. So each route declares every
# error its service's operation can answer it: test_openapi_documents.py holds them to it.)
UPSTREAM_ERRORS = (BAD_GATEWAY, SERVICE_UNAVAILABLE, *DATABASE_UNAVAILABLE_OR_BUSY,
                   UPSTREAM_TIMEOUT)
# And what a call whose work the service commits can end in besides: the service's rollback for
# the gateway's deadline (its CALLER_GAVE_UP), nothing done.
WRITE_ERRORS = (UPSTREAM_ROLLED_BACK,)

blueprint = Blueprint("shop", __name__, url_prefix="/api",
                      description="Orders and accounts, for the signed-in user",
                      errors=(*SIGNED_IN_ERRORS, *UPSTREAM_ERRORS))


# An answer that made a resource (an order placed, an account opened) says where it is read (RFC
# 9110, 10.2.2), over either transport: the path of its GET on the gateway.
LOCATION = "Location"


def _location_documented(where: str) -> dict[str, dict]:
    """The Location header as a response's document gives it: `where` the resource is read."""
    return {LOCATION: {"description": f"Where what was made is read: {where} (a path on the"
                                      " gateway)", "schema": {"type": "string"}}}


def _located(status: int, path_of: Callable[[Any], str | None]):
    """The view's answers of `status` (what it made) with a Location: `path_of` their JSON body
    (None: it names nothing, as no service answers, and the answer goes without)."""

    def decorator(view):
        @wraps(view)
        def located(*args, **kwargs):
            response = make_response(view(*args, **kwargs))
            if response.status_code == status:
                path = path_of(response.get_json(silent=True))
                if path is not None:
                    response.headers[LOCATION] = path
            return response

        return located

    return decorator


def _order_path(order: Any) -> str | None:
    """The gateway's path of `order`, an answer's body, by its id (None: it names none)."""
    order_id = order.get("id") if isinstance(order, dict) else None
    if not (isinstance(order_id, str) and order_id):
        return None
    return url_for("shop.get_order", order_id=order_id)


def _over_http() -> bool:
    return current_app.extensions["hseshop.settings"].gateway_upstream_transport == "http"


def _grpc(service: str, method: str, body: dict[str, Any], status: int,
          key_passed_on: str | None = None):
    """`method` of `service` called with `body` (which holds `key_passed_on`, the Idempotency-Key,
    on the routes that honour one: they alone pass it), answered with `status`."""
    # (A HEAD runs as its GET.)
    reply, headers = upstream_grpc.call(
        service, method, body,
        safe_to_send_again=safe_to_send_again(request.method, key_passed_on),
        under_its_key=sent_again_under_its_key(request.method, key_passed_on))
    return jsonify(reply), status, headers


@blueprint.post("/orders")
@blueprint.arguments(PlaceOrderSchema)
@blueprint.doc(parameters=[IDEMPOTENCY_KEY_PARAMETER])
@blueprint.response(202, OrderSchema, headers={**REPLAYED_RESPONSE_HEADERS, **_location_documented(
                        "`/api/orders/{id}`, the order placed")},
                    description="Accepted; the payment is asked for asynchronously",
                    links=PLACED_ORDER_LINKS)
@blueprint.errors(*PLACE_ORDER_ERRORS, *WRITE_ERRORS)
@_located(202, _order_path)
def place_order(args):
    """Place an order."""
    if _over_http():
        return forward("orders", "/orders", idempotent=True)
    key = idempotency_key_from_request()
    return _grpc("orders", "PlaceOrder", {
        "amount": format_amount(args["amount"]), "description": args["description"],
        "idempotency_key": key}, 202, key_passed_on=key)


@blueprint.get("/orders")
@blueprint.arguments(ListOrdersQuerySchema, location="query")
@blueprint.response(200, OrderPageSchema, links=ORDER_PAGE_LINKS)
@blueprint.errors(*LIST_ORDERS_ERRORS)
def list_orders(args):
    """The signed-in user's orders, newest first, a page at a time."""
    if _over_http():
        return forward("orders", "/orders", query=args)
    return _grpc("orders", "ListOrders", args, 200)


@blueprint.get("/orders/<any_text:order_id>")
@blueprint.response(200, OrderSchema)
@blueprint.errors(*GET_ORDER_ERRORS)
def get_order(order_id: str):
    """One order: NEW, FINISHED, or CANCELLED with a reason."""
    # An id that is no UUID (any text: `a%2Fb`, decoded `a/b`, and none at all are this route's,
    # shared.path_parameters) is answered here as the service would answer it, and the service is
    # asked with the id as it writes it: no path a client made up (dot segments, a line over the
    # service's limit once quoted) reaches it.
    order = order_id_from_path(order_id)
    if _over_http():
        return forward("orders", f"/orders/{order}")
    return _grpc("orders", "GetOrder", {"order_id": str(order)}, 200)


@blueprint.post("/accounts")
@blueprint.arguments(EmptySchema, required=False)
@blueprint.response(201, AccountSchema, links=OPENED_ACCOUNT_LINKS,
                    headers=_location_documented("`/api/accounts/balance`, the account opened"))
@blueprint.errors(*OPEN_ACCOUNT_ERRORS, *WRITE_ERRORS)
@_located(201, lambda _account: url_for("shop.balance"))
def open_account(_args):
    """Open the signed-in user's account."""
    if _over_http():
        return forward("payments", "/accounts")
    return _grpc("payments", "OpenAccount", {}, 201)


@blueprint.post("/accounts/deposit")
@blueprint.arguments(DepositSchema)
@blueprint.doc(parameters=[IDEMPOTENCY_KEY_PARAMETER])
@blueprint.response(200, AccountSchema, headers=REPLAYED_RESPONSE_HEADERS)
@blueprint.errors(*DEPOSIT_ERRORS, *WRITE_ERRORS)
def deposit(args):
    """Top up the signed-in user's account."""
    if _over_http():
        return forward("payments", "/accounts/deposit", idempotent=True)
    key = idempotency_key_from_request()
    return _grpc("payments", "Deposit", {"amount": format_amount(args["amount"]),
                                         "idempotency_key": key}, 200, key_passed_on=key)


@blueprint.get("/accounts/balance")
@blueprint.response(200, AccountSchema)
@blueprint.errors(*BALANCE_ERRORS)
def balance():
    """The signed-in user's balance."""
    if _over_http():
        return forward("payments", "/accounts/balance")
    return _grpc("payments", "GetBalance", {}, 200)
