"""The Orders gRPC methods: messages in and out, the same endpoint operations as the HTTP routes."""

from __future__ import annotations

import grpc
from flask import Flask

from orders_app import endpoints
from orders_app.schemas import ListOrdersQuerySchema, PlaceOrderSchema
from shared.grpc_messages import to_message
from shared.grpc_server import add_servicer, given, idempotency_key_given, serve_call
from shared.protos import orders_pb2, orders_pb2_grpc

PLACE_ORDER = PlaceOrderSchema()
LIST_ORDERS = ListOrdersQuerySchema()


class OrdersServicer(orders_pb2_grpc.OrdersServicer):
    def __init__(self, app: Flask):
        self.app = app

    def PlaceOrder(self, request, context):
        def place(user_id: str):
            args = PLACE_ORDER.load({"description": request.description,
                                     **given(request, "amount")})
            key = idempotency_key_given(request)
            return to_message(orders_pb2.Order, endpoints.place_order(user_id, args, key))
        return serve_call(self.app, context, request, place)

    def ListOrders(self, request, context):
        def page(user_id: str):
            query = LIST_ORDERS.load(given(request, "limit", "cursor"))
            body = endpoints.list_orders(user_id, query)
            return to_message(orders_pb2.OrderPage, body)
        return serve_call(self.app, context, request, page, location="query")

    def GetOrder(self, request, context):
        return serve_call(self.app, context, request, lambda user_id: to_message(
            orders_pb2.Order, endpoints.get_order(user_id, request.order_id)))


def register(server: grpc.Server, app: Flask) -> tuple[str, ...]:
    return (add_servicer(server, OrdersServicer(app), orders_pb2, "Orders"),)
