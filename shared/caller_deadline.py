"""How long the gateway waits for a service's answer, told to the service over HTTP as a gRPC call
tells it by itself (its deadline, shared/grpc_server.py): `X-Gateway-Timeout-Ms`, the milliseconds
from the moment the service reads the request. Past it, the service commits nothing
(shared.db.transaction rolls back) and answers 504 CALLER_GAVE_UP (shared.errors): the gateway
has answered its client 504 by then, and a request that client retries (an order placed without
an Idempotency-Key) must not find the first one done as well.

Not signed, as the identity is: a caller that gives a service a shorter time only has its own
request refused sooner, and one that gives none (a direct call) is waited for as before."""

from __future__ import annotations

import contextlib
import time

from flask import Flask, request

from shared.db import caller_waits_until
from shared.documented_errors import DocumentedError

TIMEOUT_HEADER = "X-Gateway-Timeout-Ms"
LONGEST_TIMEOUT_MS = 3_600_000  # more is taken as none
_BOUND = "hseshop.caller_deadline"


# The header as the OpenAPI documents of the operations that commit work describe it, and the
# error they answer once it has run out.
TIMEOUT_PARAMETER = {
    "in": "header", "name": TIMEOUT_HEADER, "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": LONGEST_TIMEOUT_MS},
    "description": "Set by the gateway: how many milliseconds from now it waits for the answer."
                   " Past them nothing is committed (504 CALLER_GAVE_UP)."}
CALLER_GAVE_UP = DocumentedError(
    504, "CALLER_GAVE_UP", f"the time the caller gave ({TIMEOUT_HEADER}) ran out before the work "
    "could commit; nothing was changed")


def timeout_headers(seconds: float) -> dict[str, str]:
    """The header that tells a service how long it is waited for."""
    return {TIMEOUT_HEADER: str(max(0, int(seconds * 1000)))}


def take_caller_deadlines(app: Flask) -> None:
    """Bind each request's deadline, when its caller gave one, for the request's duration."""

    @app.before_request
    def _bind_the_deadline() -> None:
        deadline = _deadline_given(request.headers.get(TIMEOUT_HEADER))
        if deadline is not None:
            bound = contextlib.ExitStack()
            bound.enter_context(caller_waits_until(deadline))
            request.environ[_BOUND] = bound

    @app.teardown_request
    def _unbind_the_deadline(_exc) -> None:
        bound = request.environ.pop(_BOUND, None)
        if bound is not None:
            bound.close()


def _deadline_given(header: str | None) -> float | None:
    """The time.monotonic() by which the caller stops waiting; None for no (usable) header."""
    if header is None or not header.isascii() or not header.isdigit():
        return None
    milliseconds = int(header)
    if milliseconds > LONGEST_TIMEOUT_MS:
        return None
    return time.monotonic() + milliseconds / 1000
