"""What POST /orders (and gRPC's PlaceOrder) answers a new order with: orders_app.service's
PlacedOrder, which must carry every field an order is answered with, as GET /orders/{id}'s mapped
Order does (a field missing there would be left out of the answer unsaid: marshmallow dumps the
attributes it finds)."""

from __future__ import annotations

import dataclasses

from orders_app.models import Order
from orders_app.schemas import OrderSchema
from orders_app.service import PlacedOrder


def test_a_placed_order_has_every_field_an_order_is_answered_with():
    placed = {field.name for field in dataclasses.fields(PlacedOrder)}
    assert placed == set(OrderSchema().dump_fields)
    assert placed <= set(Order.__table__.columns.keys())
