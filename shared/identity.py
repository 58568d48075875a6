"""Who is calling: the user the gateway vouched for, checked on every API request of a service."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flask import current_app, g, request

from shared.errors import Unauthorized
from shared.fields import USER_ID_PATTERN, USER_ID_RULE
from shared.internal_auth import (SIGNATURE_HEADER, USER_ID_HEADER, InvalidIdentity,
                                  header_value, verified_user_id)
from shared.single_use_signatures import note_verified_signature

# What a caller with no identity at all is told (MISSING_USER_ID), over HTTP and gRPC.
CALL_THROUGH_THE_GATEWAY = ("Call the shop through its gateway (port 8000 locally): the services"
                            " take only the requests it signs with the caller's identity.")


def authenticated_user_id(headers: Mapping[str, str], secret: str, method: str, target: str,
                          body: bytes | Callable[[], bytes]) -> str:
    """The user id the gateway signed into `headers` (an HTTP request's, or a gRPC call's
    metadata) for the request `method target` with `body` (and the X-Gateway-Deadline and
    X-Gateway-Nonce of `headers`, over HTTP their Idempotency-Key too: shared.internal_auth); 401
    when it is missing, malformed, or not signed by the gateway for this request. The signature
    verified is kept for the call, whose write without an Idempotency-Key takes it once
    (shared.single_use_signatures)."""
    user_id = header_value(headers, USER_ID_HEADER)
    if user_id is None:
        # Most often a service called directly: naming the header would invite sending it
        # unsigned, which is UNTRUSTED_IDENTITY.
        raise Unauthorized(CALL_THROUGH_THE_GATEWAY, code="MISSING_USER_ID")
    if not USER_ID_PATTERN.fullmatch(user_id):
        raise Unauthorized(
            f"The {USER_ID_HEADER} header {USER_ID_RULE}",
            code="INVALID_USER_ID",
        )
    try:
        verified = verified_user_id(headers, secret, method, target, body)
    except InvalidIdentity as exc:
        raise Unauthorized(f"Identity refused: {exc}.", code=exc.code) from None
    note_verified_signature(header_value(headers, SIGNATURE_HEADER))
    return verified


def request_target() -> str:
    """The current request's path and query exactly as its request line gave them, which the
    gateway signed: gunicorn and Werkzeug (its server and its test client) both hand it over as
    RAW_URI (REQUEST_URI too). Not request.path: that is decoded ("%2F" a "/")."""
    environ = request.environ
    return environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""


def require_user_id() -> str:
    """The caller's user id; 401 when it is missing, malformed or not signed by the gateway for
    this request: its method, target, body (read once the headers pass every other check, up to
    MAX_CONTENT_LENGTH, and kept for the view; a chunked one was read before this), and its
    Idempotency-Key, X-Gateway-Deadline and X-Gateway-Nonce headers."""
    secret = current_app.extensions["hseshop.settings"].internal_auth_secret
    g.user_id = authenticated_user_id(request.headers, secret, request.method, request_target(),
                                      lambda: request.get_data(cache=True))
    return g.user_id


def identify_caller() -> None:
    """A `before_request` hook: sets `g.user_id` or answers 401."""
    require_user_id()
