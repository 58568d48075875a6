"""The call metadata the gateway would sign, for an operator calling a service's gRPC method with a
stock client (grpcurl): its `-H` flags and the `-d` request to pass with them, on one line.

    python -m shared.grpc_signed_call_headers USER_ID hseshop.payments.v1.Payments/GetBalance
    python -m shared.grpc_signed_call_headers USER_ID hseshop.orders.v1.Orders/ListOrders \\
        -d '{"limit": 5}'

The services take no call without the gateway's signature (shared.internal_auth), and the
gateway signs only what it sends for a signed-in user: this signs one call as the gateway would,
with INTERNAL_AUTH_SECRET from the environment as the services read it (shared.config), so it is
run where that secret is (the devstack's `.run/env`, a gRPC server's container). What it prints
is good for that one call and no other: the signature covers the method and the request's
serialized bytes, and is taken within MAX_AGE_SECONDS of now, its signed deadline (when the
service stops working on the call) as far on; a write without an idempotency_key (an order, a
deposit) takes it once (a second call with it is refused, 401 SIGNATURE_USED); sent again within
the window, a keyed write's is answered with its first answer, and a read's reads again.

The request is the `-d` JSON (proto3 JSON, as grpcurl reads it; `{}` when left out), built into
the method's request message (google.protobuf.json_format) and serialized: those bytes are what
is signed. grpcurl builds its message from the same JSON and serializes it (in Go) to the same
bytes: each of the shop's request messages holds singular scalars alone, declared in their
numbers' order, which Python's serializer writes them in, and Go's too (in their numbers' order,
or for a dynamic message in their declaration's; tests/unit/test_grpc_signed_call_headers.py
keeps the messages so). Pass grpcurl exactly the `-d` printed here: another request, or JSON
that makes another message, is refused 401 UNTRUSTED_IDENTITY. So:

    eval "grpcurl -plaintext $(.venv/bin/python -m shared.grpc_signed_call_headers alice \\
        hseshop.payments.v1.Payments/GetBalance) 127.0.0.1:50052 \\
        hseshop.payments.v1.Payments/GetBalance"
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shared.caller_deadline import deadline_moment
from shared.config import settings_or_exit
from shared.internal_auth import MAX_AGE_SECONDS, grpc_identity_metadata
from shared.protos import orders_pb2, payments_pb2

# The services whose methods can be signed for (their descriptors, in protobuf's default pool).
SERVICES = (orders_pb2.DESCRIPTOR.services_by_name["Orders"],
            payments_pb2.DESCRIPTOR.services_by_name["Payments"])


def method_named(name: str) -> MethodDescriptor:
    """The method `name`, as grpcurl takes it: "package.Service/Method" or "package.Service.Method"
    (a leading "/" allowed); a KeyError if no service of the shop's has it."""
    service, _, method = name.lstrip("/").replace("/", ".").rpartition(".")
    if service not in {described.full_name for described in SERVICES}:
        raise KeyError(name)
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[method]


def request_of(method: MethodDescriptor, json_request: str) -> Message:
    """The request message of `method` built from `json_request` (proto3 JSON, as grpcurl reads
    it); a json_format.ParseError if it is none."""
    return json_format.Parse(json_request, GetMessageClass(method.input_type)())


def grpcurl_flags(user_id: str, secret: str, method: MethodDescriptor, request: Message) -> str:
    """The `-H 'name: value'` flags of the metadata that vouches for `user_id` calling `method`
    with `request`, signed with `secret`, then `-d` and the request as JSON: each quoted for a
    shell."""
    metadata = grpc_identity_metadata(
        user_id, secret, f"/{method.containing_service.full_name}/{method.name}",
        request.SerializeToString(), deadline_moment(MAX_AGE_SECONDS))
    as_json = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
    return " ".join([*(f"-H {shlex.quote(f'{name}: {value}')}" for name, value in metadata),
                     "-d", shlex.quote(as_json)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.grpc_signed_call_headers",
        description="Print grpcurl's -H flags (and -d request) for one call signed as the gateway"
                    " signs it, with INTERNAL_AUTH_SECRET; good for that call alone, within"
                    f" {MAX_AGE_SECONDS} s.")
    parser.add_argument("user_id", help="the user the call is made for")
    parser.add_argument("method", help="the full method name, as grpcurl takes it:"
                                       " hseshop.orders.v1.Orders/ListOrders")
    parser.add_argument("-d", "--data", default="{}", metavar="JSON",
                        help="the request as JSON, as grpcurl's -d (default: {})")
    args = parser.parse_args(argv)
    try:
        method = method_named(args.method)
    except KeyError:
        names = ", ".join(f"{service.full_name}/{method.name}" for service in SERVICES
                          for method in service.methods)
        parser.error(f"no method {args.method!r}: one of {names}")
    try:
        request = request_of(method, args.data)
    except json_format.ParseError as exc:
        parser.error(f"the request is no {method.input_type.full_name}: {exc}")
    settings = settings_or_exit("no call signed")
    print(grpcurl_flags(args.user_id, settings.internal_auth_secret, method, request))
    until = datetime.fromtimestamp(int(time.time()) + MAX_AGE_SECONDS, timezone.utc)
    print(f"good for one call of {method.containing_service.full_name}/{method.name} until"
          f" {until:%H:%M:%S} UTC", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
