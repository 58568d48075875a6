"""The operator's command that signs one gRPC call for grpcurl (pure logic, no I/O); that grpcurl's
call with what it prints is taken: tests/integration/test_grpc.py."""

from __future__ import annotations

import shlex

import pytest

from shared.grpc_signed_call_headers import SERVICES, grpcurl_flags, method_named, request_of
from shared.internal_auth import GRPC_METHOD, InvalidIdentity, verified_user_id

SECRET = "a secret only the gateway and the services know"


def test_every_request_message_holds_scalars_declared_in_their_numbers_order():
    """The command signs the bytes Python's protobuf makes of the request, and grpcurl sends
    those Go's make of it: alike as long as each request message holds singular scalars alone
    (no map, no repeated field, no nested message, whose serializations may differ) declared in
    their numbers' order (Go's serializer writes fields in that order, or in their declaration's
    for a dynamic message as grpcurl builds it; Python's in their numbers')."""
    for service in SERVICES:
        for method in service.methods:
            fields = method.input_type.fields
            assert [field.number for field in fields] == sorted(field.number for field in fields)
            for field in fields:
                assert not field.message_type and not field.is_repeated, \
                    f"{method.input_type.full_name}.{field.name}"


@pytest.mark.parametrize("name", ["hseshop.orders.v1.Orders/ListOrders",
                                  "hseshop.orders.v1.Orders.ListOrders",
                                  "/hseshop.orders.v1.Orders/ListOrders"])
def test_a_method_is_named_as_grpcurl_names_it(name):
    assert method_named(name).full_name == "hseshop.orders.v1.Orders.ListOrders"


@pytest.mark.parametrize("name", ["hseshop.orders.v1.Orders/Nope", "Orders/ListOrders",
                                  "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"])
def test_a_method_of_no_service_of_the_shops_is_none(name):
    with pytest.raises(KeyError):
        method_named(name)


def test_the_flags_vouch_for_the_user_on_the_request_printed_with_them_alone():
    method = method_named("hseshop.payments.v1.Payments/Deposit")
    printed = shlex.split(grpcurl_flags("usr_1", SECRET, method,
                                        request_of(method, '{"amount": "10.00"}')))
    assert printed[-2:] == ["-d", '{"amount": "10.00"}']
    assert printed[:-2:2] == ["-H"] * 5
    metadata = dict(value.split(": ", 1) for value in printed[1:-2:2])
    full_method = "/hseshop.payments.v1.Payments/Deposit"
    sent = request_of(method, printed[-1]).SerializeToString()
    assert verified_user_id(metadata, SECRET, GRPC_METHOD, full_method, sent) == "usr_1"
    with pytest.raises(InvalidIdentity):
        verified_user_id(metadata, SECRET, GRPC_METHOD, full_method,
                         request_of(method, '{"amount": "10.01"}').SerializeToString())
