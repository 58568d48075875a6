"""Calling a service directly as the gateway does, which signs each request it sends for its
method, path and query, body, Idempotency-Key and deadline, with a nonce of its own
(shared.internal_auth): Flask's test client given `signed_as`, and gRPC call metadata for one
call's method, message and deadline."""

from __future__ import annotations

import io

from flask import Flask
from flask.testing import FlaskClient

from shared.caller_deadline import deadline_moment
from shared.internal_auth import (DEADLINE_HEADER, SIGNED_HEADERS, SignedAs,
                                  grpc_identity_metadata, identity_headers)
from tests.environment import TEST_SECRETS


# The deadline a request is signed with unless told: later than any test waits for an answer.
SIGNED_DEADLINE_SECONDS = 60.0
_DEADLINE_KEY = f"HTTP_{DEADLINE_HEADER.upper().replace('-', '_')}"
# X-Gateway-Deadlines of no form the services document (up to 12 digits, up to 6 decimals), which
# each refuses 400 INVALID_DEADLINE once their signature holds, over HTTP and gRPC alike.
MALFORMED_DEADLINES = {
    "empty": "", "a word": "soon", "negative": "-1", "an exponent": "1e9",
    "not ASCII digits": "١٧٠٠٠٠٠٠٠٠", "13 digits": "1" * 13, "7 decimals": "1700000000.1234567",
    "5,000 digits": "9" * 5000, "a point and no decimals": "1700000000.",
    "two joined (the header given twice)": "1700000000,1700000060"}
# Those gRPC metadata can carry: printable ASCII (grpcio sends no other).
MALFORMED_DEADLINES_IN_METADATA = {name: given for name, given in MALFORMED_DEADLINES.items()
                                   if given.isascii()}


class GatewaySignedClient(FlaskClient):
    """A Flask test client whose requests can be sent as the gateway sends them for a user:
    `client.post("/orders", json=body, signed_as=user_id)`, signed once built (its method,
    RAW_URI, body, Idempotency-Key and X-Gateway-Deadline as the app will read them, and its
    X-Gateway-Nonce) with the app's own INTERNAL_AUTH_SECRET, or with `signed_with`. An identity
    header the request is given itself is sent instead of the one signed (a test's tampering with
    it). Like the gateway's, each carries an X-Gateway-Deadline (SIGNED_DEADLINE_SECONDS on)
    unless it is given one, and a nonce of its own: two requests alike are two signatures, as the
    gateway's are, not one taken twice (a write without an Idempotency-Key takes its signature
    once: shared.single_use_signatures)."""

    def open(self, *args, signed_as: str | None = None, signed_with: str | None = None,
             buffered: bool = False, follow_redirects: bool = False, **kwargs):
        if signed_as is None:
            return super().open(*args, buffered=buffered, follow_redirects=follow_redirects,
                                **kwargs)
        request = self._request_from_builder_args(args, kwargs)
        environ = request.environ
        body = environ["wsgi.input"].read()
        environ["wsgi.input"] = io.BytesIO(body)  # (read again by the app)
        environ.setdefault(_DEADLINE_KEY, deadline_moment(SIGNED_DEADLINE_SECONDS))
        secret = signed_with or self.application.extensions["hseshop.settings"].internal_auth_secret
        sent_with = {name: environ[key] for name in SIGNED_HEADERS
                     if (key := f"HTTP_{name.upper().replace('-', '_')}") in environ}
        signed = identity_headers(signed_as, secret, environ["REQUEST_METHOD"],
                                  environ["RAW_URI"], body, sent_with=sent_with)
        for name, value in signed.items():
            environ.setdefault(f"HTTP_{name.upper().replace('-', '_')}", value)
        return super().open(request, buffered=buffered, follow_redirects=follow_redirects)


class SignedWithADeadline(SignedAs):
    """A requests `auth` that signs each request as the gateway sends it, with an
    X-Gateway-Deadline (SIGNED_DEADLINE_SECONDS on) unless it has one (see
    GatewaySignedClient)."""

    def __call__(self, prepared):
        prepared.headers.setdefault(DEADLINE_HEADER, deadline_moment(SIGNED_DEADLINE_SECONDS))
        return super().__call__(prepared)


def use_gateway_signed_clients() -> None:
    """Every Flask app's test_client() a GatewaySignedClient (one without `signed_as` sends what
    it always did): the tests build the services' apps in many places."""
    Flask.test_client_class = GatewaySignedClient


def grpc_signed(user_id: str, full_method: str, request,
                secret: str = TEST_SECRETS["INTERNAL_AUTH_SECRET"], *,
                deadline_seconds: float = SIGNED_DEADLINE_SECONDS
                ) -> tuple[tuple[str, str], ...]:
    """The metadata the gateway sends with a call of `full_method` (its "/package.Service/Method")
    for `user_id`, its signed deadline `deadline_seconds` from now: `request` a message, or the
    bytes sent as they are."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    return tuple(grpc_identity_metadata(user_id, secret, full_method, raw,
                                        deadline_moment(deadline_seconds)))
