"""The Orders API's request and response schemas, the errors of its operations beyond those of
every request, and the links from its answers to the operations their fields feed (all also
documented by the gateway)."""

from __future__ import annotations

import uuid

from marshmallow import RAISE, Schema, fields, validate

from orders_app.models import STATUSES
from shared.contracts import FAILURE_REASONS
from shared.documented_errors import IDEMPOTENCY_ERRORS, DocumentedError
from shared.errors import NotFound
from shared.fields import Amount, Text, WholeNumber
from shared.operation_links import link

MAX_PAGE = 200
# A page's size when the request names none, and the one the shop's page asks for (ORDERS_PAGE
# in gateway_app/web/app.js).
DEFAULT_PAGE = 50

INVALID_CURSOR = DocumentedError(400, "INVALID_CURSOR", (
    "the `cursor` names no position: it is not of the form a page's `next_cursor` is (base64url, "
    "padded or not, of the position's JSON as `next_cursor` writes it, byte for byte)"))
ORDER_NOT_FOUND = DocumentedError(404, "ORDER_NOT_FOUND", "the caller has no order of this id")
PLACE_ORDER_ERRORS = IDEMPOTENCY_ERRORS
LIST_ORDERS_ERRORS = (INVALID_CURSOR,)
GET_ORDER_ERRORS = (ORDER_NOT_FOUND,)
# (the operations named as the views of orders_app/api.py and gateway_app/routes.py are)
PLACED_ORDER_LINKS = {"GetOrder": link(
    "get_order", "The order placed, read by its `id`: NEW until its payment is taken, then "
    "FINISHED or CANCELLED", order_id="$response.body#/id")}
ORDER_PAGE_LINKS = {"NextPage": link(
    "list_orders", "The next page of orders, older than this one's, while `next_cursor` is not "
    "null", cursor="$response.body#/next_cursor")}


def order_id_from_path(order_id: str) -> uuid.UUID:
    """The order id a path names; 404 ORDER_NOT_FOUND when it is no UUID (so no order's)."""
    try:
        return uuid.UUID(order_id)
    except ValueError:
        raise NotFound("No such order.", code="ORDER_NOT_FOUND") from None


class PlaceOrderSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, example="30.00")
    description = Text(load_default="", validate=validate.Length(max=500))


# The answers' schemas only ever dump, and every field is always sent: `required` says so in the
# OpenAPI documents (a client generated from them need not take each field as optional).
class OrderSchema(Schema):
    id = fields.UUID(required=True)
    user_id = fields.String(required=True)
    amount = Amount.answered(required=True)
    description = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": list(STATUSES)})
    # Why a CANCELLED order was (null otherwise): the reasons a payment fails for.
    reason = fields.String(required=True, allow_none=True,
                           metadata={"enum": [*FAILURE_REASONS, None]})
    created_at = fields.DateTime(required=True, format="iso")
    updated_at = fields.DateTime(required=True, format="iso")


class OrderPageSchema(Schema):
    items = fields.List(fields.Nested(OrderSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class ListOrdersQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = WholeNumber(load_default=DEFAULT_PAGE, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.String(load_default=None, validate=validate.Length(min=1, max=500), metadata={
        "description": "A page's `next_cursor`, for the page after it: a position in the list, "
                       "not a token (neither signed nor secret: one written by hand in "
                       "`next_cursor`'s form is taken, and reads the caller's own orders only, as "
                       "any)"})
