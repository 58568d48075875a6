"""The Orders HTTP API: request and response schemas, and thin routes over the use cases."""

from __future__ import annotations

import uuid

from flask import g, jsonify
from shared.http_api import Blueprint
from marshmallow import RAISE, Schema, fields, validate

from orders_app import service
from orders_app.models import STATUSES
from shared.db import db, transaction
from shared.errors import NotFound
from shared.fields import Amount
from shared.idempotency import idempotency_key_from_request, run_idempotently

blueprint = Blueprint("orders", __name__, url_prefix="/orders", description="Place and read orders")

MAX_PAGE = 200


class PlaceOrderSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, metadata={"example": "30.00"})
    description = fields.String(load_default="", validate=validate.Length(max=500))


class OrderSchema(Schema):
    id = fields.UUID()
    user_id = fields.String()
    amount = Amount()
    description = fields.String()
    status = fields.String(metadata={"enum": list(STATUSES)})
    reason = fields.String(allow_none=True)
    created_at = fields.DateTime(format="iso")
    updated_at = fields.DateTime(format="iso")


class OrderPageSchema(Schema):
    items = fields.List(fields.Nested(OrderSchema))
    next_cursor = fields.String(allow_none=True)


class ListOrdersQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.String(load_default=None, validate=validate.Length(min=1, max=500))


ORDER = OrderSchema()


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
    page = service.list_orders(db.session, user_id=g.user_id, **args)
    return {"items": page.items, "next_cursor": page.next_cursor}


@blueprint.get("/<order_id>")
@blueprint.response(200, OrderSchema)
def get_order(order_id: str):
    """One of the caller's orders."""
    try:
        parsed = uuid.UUID(order_id)
    except ValueError:
        raise NotFound("No such order.", code="ORDER_NOT_FOUND") from None
    return service.get_order(db.session, user_id=g.user_id, order_id=parsed)
