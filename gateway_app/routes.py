"""The public shop API under /api: each route is documented with the owning service's schemas and
forwarded to that service as it is (the service validates and answers)."""

from __future__ import annotations

from urllib.parse import quote

from gateway_app.proxy import forward
from orders_app.schemas import ListOrdersQuerySchema, OrderPageSchema, OrderSchema, PlaceOrderSchema
from payments_app.schemas import AccountSchema, DepositSchema
from shared.http_api import Blueprint

blueprint = Blueprint("shop", __name__, url_prefix="/api",
                      description="Orders and accounts, for the signed-in user")

IDEMPOTENCY_KEY = {"in": "header", "name": "Idempotency-Key", "required": False,
                   "schema": {"type": "string", "maxLength": 255},
                   "description": "A retry with the same key and body returns the first response."}


def _json_body(schema) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


@blueprint.post("/orders")
@blueprint.doc(**_json_body(PlaceOrderSchema), parameters=[IDEMPOTENCY_KEY])
@blueprint.response(202, OrderSchema, description="Accepted; the payment is asked for asynchronously")
def place_order():
    """Place an order."""
    return forward("orders", "/orders")


@blueprint.get("/orders")
@blueprint.arguments(ListOrdersQuerySchema, location="query", as_kwargs=True)
@blueprint.response(200, OrderPageSchema)
def list_orders(**_query):
    """The signed-in user's orders, newest first, a page at a time."""
    return forward("orders", "/orders")


@blueprint.get("/orders/<order_id>")
@blueprint.response(200, OrderSchema)
def get_order(order_id: str):
    """One order: NEW, FINISHED, or CANCELLED with a reason."""
    return forward("orders", f"/orders/{quote(order_id, safe='')}")


@blueprint.post("/accounts")
@blueprint.response(201, AccountSchema)
def open_account():
    """Open the signed-in user's account."""
    return forward("payments", "/accounts")


@blueprint.post("/accounts/deposit")
@blueprint.doc(**_json_body(DepositSchema), parameters=[IDEMPOTENCY_KEY])
@blueprint.response(200, AccountSchema)
def deposit():
    """Top up the signed-in user's account."""
    return forward("payments", "/accounts/deposit")


@blueprint.get("/accounts/balance")
@blueprint.response(200, AccountSchema)
def balance():
    """The signed-in user's balance."""
    return forward("payments", "/accounts/balance")
