"""The Payments gRPC methods: messages in and out, the endpoint operations the HTTP routes use."""

from __future__ import annotations

import grpc
from flask import Flask

from payments_app import endpoints
from payments_app.schemas import DepositSchema
from shared.grpc_messages import to_message
from shared.grpc_server import add_servicer, given, idempotency_key_given, serve_call
from shared.protos import payments_pb2, payments_pb2_grpc

DEPOSIT = DepositSchema()


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(self, app: Flask):
        self.app = app

    def OpenAccount(self, request, context):
        return serve_call(self.app, context, request, lambda user_id: to_message(
            payments_pb2.Account, endpoints.open_account(user_id)))

    def Deposit(self, request, context):
        def deposit(user_id: str):
            args = DEPOSIT.load(given(request, "amount"))
            key = idempotency_key_given(request)
            return to_message(payments_pb2.Account, endpoints.deposit(user_id, args, key))
        return serve_call(self.app, context, request, deposit)

    def GetBalance(self, request, context):
        return serve_call(self.app, context, request, lambda user_id: to_message(
            payments_pb2.Account, endpoints.balance(user_id)))


def register(server: grpc.Server, app: Flask) -> tuple[str, ...]:
    return (add_servicer(server, PaymentsServicer(app), payments_pb2, "Payments"),)
