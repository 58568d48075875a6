"""When the gateway gives up on a service's work, told to the service: `X-Gateway-Deadline`,
a moment in seconds since the epoch, an HTTP header or (in lower case) gRPC call metadata. Past
it, the service commits no new work (shared.db.transaction rolls back) and answers 504
CALLER_GAVE_UP (shared.errors; over gRPC DEADLINE_EXCEEDED, with that error's trailers:
shared.grpc_server): the gateway answers its client 504, and a request that client retries (an
order placed without an Idempotency-Key) must not find the first one done as well. A repeat under
an Idempotency-Key whose work is done commits nothing new, and is answered the stored answer past
it too (shared.db.nothing_new_to_commit, shared.idempotency): a CALLER_GAVE_UP comes only from a
request that found none and rolled its own work back.

The gateway waits for the answer COMMIT_GRACE_SECONDS past that moment: the service looks at it as
its work is done and again once it is flushed (a flush's wait for a lock counted in), and the
COMMIT that follows takes its time (an fsync, a synchronous replica). Waiting to the moment alone,
a COMMIT begun a few milliseconds before it was answered 504 "may still have taken effect" while
the order was placed, and a client retrying without a key placed a second one. Now the answer the
gateway relays is the service's: its 201 or 202, or its CALLER_GAVE_UP, nothing committed, which the
gateway answers as a 504 CALLER_GAVE_UP of its own that names the service and says nothing was done
(gateway_app/upstream_answers.py; but for a second try's, which says nothing of the first:
gateway_app/resends.py). Only a service silent past the grace too (over gRPC, a DEADLINE_EXCEEDED
of the gateway's own timer, with none of the service's trailers), or something in front of it
timing out, is the gateway's 504 UPSTREAM_TIMEOUT ("may still have taken effect").

A moment, not a number of seconds: the request may wait before the service reads it (for a server
thread, in a backlog), and that wait is the caller's too; and a request the gateway sends again
(gateway_app/resends.py) carries the same moment. It holds as far as the clocks of the gateway's and
the service's hosts agree, and they must agree to well under UPSTREAM_TIMEOUT_SECONDS (one host's:
exactly): a service whose clock runs ahead refuses every write as too late, one whose clock runs
behind commits some after the gateway's 504. A request that arrives with its moment passed is logged
(a backlog, or clocks that disagree).

Signed with the identity (shared.internal_auth), so that a captured request sent again cannot
carry a later moment and commit after the gateway's 504. Over HTTP it may be left out (a direct
call, waited for as before); a gRPC call must carry it, and the service keeps the earlier of it
and the call's own deadline (its gRPC timeout, which the caller sets and nobody signs:
shared/grpc_server.py).

One given that is no moment of its documented form (empty, not digits, too many of them; the
header given twice, which the HTTP server joins with a comma, as shared.grpc_server joins a key
given twice in a call's metadata) is refused 400 INVALID_DEADLINE, over gRPC INVALID_ARGUMENT:
taken as none, it had the work commit after the gateway's 504. Only once the request's
identity is verified, as every other look at the deadline: the value is signed, so one that is
not the gateway's fails the signature first (401, as any header tampered with, or any value
added to it, over either transport), and a 400 says that the gateway signed a deadline the
service cannot read (a fault of the gateway's, which never writes one: deadline_moment). But for
an empty one added to a request signed without a deadline, which the signature signs as none
(shared.internal_auth): it holds, and the request is a 400. Only a direct caller's own request
can be so replayed: the gateway signs a deadline into every request."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterable

from flask import Flask, request

from shared.config import FURTHEST_DEADLINE_SECONDS
from shared.db import caller_waits_until
from shared.documented_errors import INVALID_DEADLINE, DocumentedError
from shared.errors import ApiError
from shared.internal_auth import DEADLINE_HEADER, MAX_AHEAD_SECONDS

log = logging.getLogger(__name__)

# A deadline further off than this is taken as none (a clock far off, or no deadline meant): the
# furthest the gateway writes, FURTHEST_DEADLINE_SECONDS on (its UPSTREAM_TIMEOUT_SECONDS is held
# to it: shared.config), on a clock that may run ahead of this host's as far as the signature
# takes: MAX_AHEAD_SECONDS, and the second its timestamp drops (whole seconds, truncated), so
# under 6 s. Held to FURTHEST_DEADLINE_SECONDS alone, the longest timeout's deadline was taken as
# none by a service whose clock ran a millisecond behind the gateway's.
FURTHEST_TAKEN_SECONDS = FURTHEST_DEADLINE_SECONDS + MAX_AHEAD_SECONDS + 1
_DEADLINE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_BOUND = "hseshop.caller_deadline"
# How long past the moment it signs the gateway still waits for a service's answer, over either
# transport (gateway_app/upstream_grpc.py, upstream_http.py): for a COMMIT begun before it to end
# and be answered, which a slow disk or a synchronous replica can take a good part of a second for.
COMMIT_GRACE_SECONDS = 1.0

# The header as the OpenAPI documents of a service's operations describe it (the gateway sends it
# with every call, and each refuses one of another form: INVALID_DEADLINE, documented with every
# operation's errors), and the error those that commit work answer once its moment has passed.
# No example: any moment written in the document passes, and Swagger UI's "Try it out" would
# send it with every request (each refused 504).
DEADLINE_PARAMETER = {
    "in": "header", "name": DEADLINE_HEADER, "required": False,
    "schema": {"type": "string", "pattern": f"^{_DEADLINE.pattern}$"},
    "description": "Set by the gateway: the moment it gives up on the request's work (it waits "
                   f"{COMMIT_GRACE_SECONDS:g} s more for the answer, for a COMMIT begun before), "
                   "in seconds since the epoch (up to 12 digits, and up to 6 decimals). Past it "
                   "no new work is committed (an operation that commits work answers 504 "
                   "CALLER_GAVE_UP; a repeat under an Idempotency-Key already carried out, "
                   "which commits nothing new, is answered its first answer). Given, it must "
                   "be of that form, once (400 INVALID_DEADLINE otherwise): leave it out when "
                   "calling the service yourself."}
CALLER_GAVE_UP = DocumentedError(
    504, "CALLER_GAVE_UP", f"the moment the caller gave ({DEADLINE_HEADER}) passed before the "
    "request's work could commit; it was rolled back (no answer was stored under its "
    "Idempotency-Key, if it had one: a repeat of a request carried out is answered that answer)")


def deadline_moment(seconds_from_now: float) -> str:
    """The X-Gateway-Deadline (or gRPC metadata) value `seconds_from_now`, to the microsecond:
    the moment the caller gives up on the work, signed with the request so that a captured one
    cannot be sent again with a later moment. It does not tell two requests of a user alike in
    all else apart (two gateway processes or threads can write the same moment): the nonce signed
    with each does (shared.internal_auth). Never one a service refuses: a ValueError rather than
    send it (UPSTREAM_TIMEOUT_SECONDS, held to FURTHEST_DEADLINE_SECONDS by shared.config, keeps the
    moment's 12 digits before its point enough for the next 30,000 years)."""
    moment = f"{time.time() + seconds_from_now:.6f}"
    if not _DEADLINE.fullmatch(moment):
        raise ValueError(f"no deadline a service takes: {moment!r} ({seconds_from_now!r} s on)")
    return moment


def deadline_headers(seconds_from_now: float) -> dict[str, str]:
    """The header that tells a service when its caller gives up on the work."""
    return {DEADLINE_HEADER: deadline_moment(seconds_from_now)}


def take_caller_deadlines(app: Flask, blueprints: Iterable[str]) -> None:
    """Bind each request's deadline, when its caller gave one, for the request's duration: on the
    routes of `blueprints`, once the before-requests they have so far (the caller's identity
    checked) have passed, so that nothing of a caller that is not the gateway's deadline is read
    or logged (one long past says the clocks may disagree), as over gRPC (shared.grpc_server)."""
    for name in blueprints:
        app.before_request_funcs.setdefault(name, []).append(_bind_the_deadline)
    app.teardown_request(_unbind_the_deadline)


def _bind_the_deadline() -> None:
    deadline = deadline_given(request.headers.get(DEADLINE_HEADER))
    if deadline is not None:
        bound = contextlib.ExitStack()
        bound.enter_context(caller_waits_until(deadline))
        request.environ[_BOUND] = bound


def _unbind_the_deadline(_exc) -> None:
    bound = request.environ.pop(_BOUND, None)
    if bound is not None:
        bound.close()


def deadline_given(header: str | None) -> float | None:
    """The time.monotonic() by which the caller gives up on the work; None for no header (or gRPC
    metadata value), or one further off than FURTHEST_TAKEN_SECONDS. One of another form than
    DEADLINE_PARAMETER's pattern is refused: ApiError 400 INVALID_DEADLINE."""
    if header is None:
        return None
    if not _DEADLINE.fullmatch(header):
        raise ApiError(f"{DEADLINE_HEADER} must be a moment in seconds since the epoch: up to 12"
                       " digits, and up to 6 decimals after a point.", code=INVALID_DEADLINE.code,
                       status=INVALID_DEADLINE.status)
    left = float(header) - time.time()
    if left > FURTHEST_TAKEN_SECONDS:
        return None
    if left <= 0:
        log.warning("a request came %.3f s after its caller's deadline (a backlog, or the clocks"
                    " of the caller's and this host disagree): no new work of it will be committed",
                    -left)
    return time.monotonic() + left
