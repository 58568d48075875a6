"""Routing /api/... to the service that owns it, passing method, body, query, status and the
Idempotency-Key through (and a replayed answer's Idempotent-Replayed back), with the caller's
identity signed by the gateway and the request id.

A service that cannot be reached answers 503, one too slow 504 (one deadline for the whole call,
gateway_app/upstream_http.py), one that fails (or refuses the gateway's signed identity, or answers
what is no answer of its API: not JSON, an error of another shape or a 4xx whose status and code
the route does not document, as a 404 NOT_FOUND for a path it does not know or a 405, a redirect)
502: always the usual JSON error, never a hang and never a stack trace. A request that a
kept-alive connection was closed on is sent again where that is safe (upstream_http.py; what is
safe: resends.py). A service that answers 503 itself, with the usual JSON error (its database
unavailable, say), is relayed as it is, its Retry-After passed on as seconds, 1 to a day's
(gateway_app/upstream_answers.py; one that is none, left out).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import requests
from flask import Response, current_app, g, request
from urllib3.exceptions import ProtocolError, ReadTimeoutError
from webargs.flaskparser import is_json_request

from gateway_app.resends import safe_to_send_again, sent_again_under_its_key
from gateway_app.upstream_answers import (UNREADABLE_JSON, Route, failure_for_status,
                                          retry_after_passed_on)
from gateway_app.upstream_http import error_code_of, send
from shared.caller_deadline import deadline_headers
from shared.errors import BadGateway, ServiceUnavailable, UpstreamTimeout
from shared.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER, idempotency_key_from_request
from shared.internal_auth import SignedAs
from shared.request_context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)

# (and its Retry-After, if it is one: gateway_app/upstream_answers.py)
FORWARDED_RESPONSE_HEADERS = ("Content-Type", REPLAYED_HEADER)


def forward(service: str, path: str, idempotent: bool = False,
            query: Mapping[str, Any] | None = None) -> Response:
    """Send the current request to `service` at `path` and relay its answer; `idempotent` for
    the routes that honour an Idempotency-Key, `query` the query parameters of a route that takes
    some, as the gateway parsed them.

    Of the client's request only what the gRPC transport passes on goes too, so that both answer
    alike: the key where it counts (checked here, as the gRPC route checks it), the query as
    parsed (not as the client wrote it), and a JSON body, which the gateway has already parsed,
    with its type (a body of another type the gateway has answered 415 already, on every route
    that takes one, before anything is forwarded).
    (Nothing else a client sends can then make a header that HTTP cannot carry.)"""
    settings = current_app.extensions["hseshop.settings"]
    base = {"orders": settings.orders_service_url,
            "payments": settings.payments_service_url}[service]
    headers: dict[str, str] = {}
    key = idempotency_key_from_request() if idempotent else None
    if key:
        headers[IDEMPOTENCY_HEADER] = key
    # A body only where the route takes one: the gRPC transport reads none on a GET (nor would the
    # service), so a big one there is no 413 over HTTP either.
    body = request.get_data() if request.method == "POST" and is_json_request(request) else b""
    if body:
        headers["Content-Type"] = "application/json"
    headers[REQUEST_ID_HEADER] = current_request_id() or ""
    # Past it the service commits nothing, as over gRPC; its answer is waited for a grace longer,
    # for a COMMIT begun before it (upstream_http.send: shared/caller_deadline.py).
    headers.update(deadline_headers(settings.upstream_timeout_seconds))
    # The values the gateway parsed, as the gRPC transport passes them on (defaults included, a
    # None left out), encoded afresh: the string as typed, "%35" or an escape that is none
    # ("%zz"), would reach the service as something else ("%2535": requests quotes every "%" again
    # once one is not an escape).
    if query is None and request.args:
        # A route that takes none refuses a query before this; one that takes some passes it.
        raise RuntimeError(f"{request.path}: a query, and none passed on as parsed (query=)")
    params = {name: value for name, value in (query or {}).items() if value is not None}
    # A HEAD is asked as its GET, as the gRPC transport runs it: the service's HEAD answer has no
    # body, so its own 503 (with Retry-After) could not be told from a failure's. Flask leaves
    # the body out of the answer to the client, and keeps its length.
    method = "GET" if request.method == "HEAD" else request.method
    try:
        upstream = send(
            service, method, f"{base}{path}",
            deadline_seconds=settings.upstream_timeout_seconds,
            safe_to_repeat=safe_to_send_again(method, key),
            under_its_key=sent_again_under_its_key(method, key),
            params=params, data=body, headers=headers, allow_redirects=False,
            # Signed as each try is sent (a resend's timestamp and nonce its own), for its method,
            # path and query as sent, body, Idempotency-Key and deadline.
            auth=SignedAs(g.user_id, settings.internal_auth_secret))
    except requests.ConnectionError as exc:
        if exc.args and isinstance(exc.args[0], ReadTimeoutError):
            # Its answer begun, and its body stalled or too slow to come whole by the deadline
            # (requests calls that a connection error).
            log.warning("%s timed out in the middle of its answer", service)
            raise UpstreamTimeout.of(service) from None
        if exc.args and isinstance(exc.args[0], ProtocolError):
            # Connected, and closed without an answer (its worker killed, say): the request may
            # have been carried out, which "unavailable" would deny.
            log.warning("%s closed the connection without answering: %r", service, exc)
            raise BadGateway.of(service) from None
        # Refused, unresolvable, or no connection in time.
        log.warning("%s unreachable: %s", service, exc)
        raise ServiceUnavailable.of(service) from None
    except requests.Timeout:  # connected, but the request not taken or no answer's head in time
        log.warning("%s timed out", service)
        raise UpstreamTimeout.of(service) from None
    except requests.RequestException as exc:  # an answer broken off (its worker killed, say)
        log.warning("%s answered brokenly: %r", service, exc)
        raise BadGateway.of(service) from None
    failure = failure_for_status(service, upstream.status_code, route=Route.of_the_request(),
                                 unavailable_for_now=_unavailable_for_now(upstream),
                                 said=lambda: upstream.text,
                                 error_code=lambda: error_code_of(upstream))
    if failure is not None:
        raise failure
    if not _an_answer_of_the_api(upstream):  # (a URL that names something else, say)
        log.error("%s answered %s, %s: %s", service, upstream.status_code,
                  upstream.headers.get("Content-Type"), upstream.text[:500])
        raise BadGateway.of(service)
    response = Response(upstream.content, status=upstream.status_code)
    for name in FORWARDED_RESPONSE_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    retry_after = retry_after_passed_on(service, upstream.headers.get("Retry-After"))
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def _an_answer_of_the_api(upstream: requests.Response) -> bool:
    """JSON, as every answer of the services' APIs is, its body as well as its type (one cut
    short, or none), an error in their shape, and no redirect (none of theirs is one): what the
    gRPC transport would have turned into a reply (or a 502)."""
    media_type = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type != "application/json" or 300 <= upstream.status_code < 400:
        return False
    if upstream.status_code >= 400:
        return _an_error_of_the_api(upstream)
    try:
        json.loads(upstream.content)
    except UNREADABLE_JSON:
        return False
    return True


def _unavailable_for_now(upstream: requests.Response) -> bool:
    """A 503 the service answered itself, as the usual JSON error: it can say when to retry."""
    return upstream.status_code == 503 and _an_error_of_the_api(upstream)


def _an_error_of_the_api(upstream: requests.Response) -> bool:
    """The answer's body is an error as the APIs answer one (upstream_http.error_code_of)."""
    return error_code_of(upstream) is not None
