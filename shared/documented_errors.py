"""The errors the OpenAPI documents say an operation can answer: each a status, a stable code and
when it is answered, documented as one response per status in the one error shape, its
description naming the codes it carries. The errors every app or service gives are here; each
API's own are beside its schemas."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from http import HTTPStatus

from shared.config import MAX_REQUEST_BYTES
from shared.errors import ErrorSchema, UpstreamRolledBack
from shared.idempotency import (IDEMPOTENCY_HEADER, MAX_KEY_LENGTH, REPLAYED_HEADER,
                                REPLAYED_RESPONSE_HEADERS, KeyInUse)
from shared.internal_auth import DEADLINE_HEADER, USER_ID_HEADER


# The headers an error can be answered with (DocumentedError.headers), as the documents describe
# them: each its description and schema.
RETRY_AFTER = "Retry-After"
ACCEPT_ENCODING = "Accept-Encoding"
WWW_AUTHENTICATE = "WWW-Authenticate"
UPGRADE = "Upgrade"
SEC_WEBSOCKET_VERSION = "Sec-WebSocket-Version"
ANSWER_HEADERS = {
    RETRY_AFTER: ("Seconds to wait before trying again", {"type": "integer", "minimum": 1}),
    WWW_AUTHENTICATE: ("The challenge (RFC 6750): `Bearer` when the request sent no bearer token"
                       " (and to a sign-in's wrong password), `Bearer error=\"invalid_token\"` when"
                       " its token was refused", {"type": "string"}),
    ACCEPT_ENCODING: ("The only content coding a request body is taken in, `identity` (none): sent"
                      " when the body came in another", {"type": "string", "enum": ["identity"]}),
    UPGRADE: ("The protocol to ask for instead (RFC 9110, 15.5.22): `websocket`",
              {"type": "string", "enum": ["websocket"]}),
    SEC_WEBSOCKET_VERSION: ("The WebSocket version the gateway speaks (RFC 6455, 4.4): `13`",
                            {"type": "string", "enum": ["13"]}),
    REPLAYED_HEADER: (REPLAYED_RESPONSE_HEADERS[REPLAYED_HEADER]["description"],
                      REPLAYED_RESPONSE_HEADERS[REPLAYED_HEADER]["schema"]),
}


@dataclass(frozen=True)
class DocumentedError:
    """An error an operation can answer: its status, its `error.code`, when it is given and the
    headers it is answered with (those of ANSWER_HEADERS)."""

    status: int
    code: str
    when: str
    headers: tuple[str, ...] = ()


MALFORMED_REQUEST = DocumentedError(
    400, "MALFORMED_REQUEST", "the body, sent as JSON, is no JSON that can be read (malformed, "
    "NaN or Infinity, nested too deep)")
INVALID_IDEMPOTENCY_KEY = DocumentedError(
    400, "INVALID_IDEMPOTENCY_KEY",
    f"the {IDEMPOTENCY_HEADER} is not 1 to {MAX_KEY_LENGTH} printable ASCII characters but a "
    "comma once the spaces and tabs at its ends are dropped (all spaces, say), or is given more "
    "than once (joined by a comma)")
UNSUPPORTED_MEDIA_TYPE = DocumentedError(
    415, "UNSUPPORTED_MEDIA_TYPE", "a body was sent with a Content-Type other than JSON "
    "(`application/json`), or with none, or in a Content-Encoding (gzip, say: none is read)",
    headers=(ACCEPT_ENCODING,))
BODY_TOO_LARGE = DocumentedError(413, "REQUEST_ENTITY_TOO_LARGE",
                                 f"the body is over {MAX_REQUEST_BYTES // 1024} KiB")
VALIDATION_ERROR = DocumentedError(
    422, "VALIDATION_ERROR", "the body or the query does not hold to the operation's schema, "
    "has a field it does not take, or gives a query parameter more than once (`details`: the "
    "messages by location and field)")
IDEMPOTENCY_KEY_REUSED = DocumentedError(
    422, "IDEMPOTENCY_KEY_REUSED", f"the {IDEMPOTENCY_HEADER} was used with another body")
IDEMPOTENCY_KEY_IN_USE = DocumentedError(
    503, KeyInUse.code, f"the {IDEMPOTENCY_HEADER} is held by another transaction (past the 2 s "
    "this one waits for a lock): most likely an earlier request under it, still in progress, "
    "which may yet take effect; nothing was done by this one: retry shortly with the same key, "
    "which is answered the earlier one's answer",
    headers=(RETRY_AFTER,))
DATABASE_UNAVAILABLE = DocumentedError(
    503, "DATABASE_UNAVAILABLE", "the service cannot reach its database just now",
    headers=(RETRY_AFTER,))
DATABASE_BUSY = DocumentedError(
    503, "DATABASE_BUSY", "the service's database was too busy to finish the request in time; "
    "nothing was changed", headers=(RETRY_AFTER,))

# The identity a service's every route checks (shared.identity): the gateway's, signed.
MISSING_USER_ID = DocumentedError(401, "MISSING_USER_ID", f"no {USER_ID_HEADER} header: the "
                                  "service was called other than through the gateway")
INVALID_USER_ID = DocumentedError(401, "INVALID_USER_ID", f"the {USER_ID_HEADER} is no user id")
UNTRUSTED_IDENTITY = DocumentedError(
    401, "UNTRUSTED_IDENTITY", f"the {USER_ID_HEADER} is not signed by the gateway for this "
    "request (its method, path and query, body, Idempotency-Key, X-Gateway-Deadline and "
    "X-Gateway-Nonce), carries no nonce or one of another form, or its signature is of no format "
    "this release knows, has expired or is dated ahead")
SIGNATURE_VERSION_MISMATCH = DocumentedError(
    401, "SIGNATURE_VERSION_MISMATCH", "the gateway's signature is of an earlier release's format "
    "(v2, or 64 hex digits unversioned): the gateway and the service are deployed apart")
# Only a write that honours an Idempotency-Key, sent without one (shared.single_use_signatures).
SIGNATURE_USED = DocumentedError(
    401, "SIGNATURE_USED", "sent without an Idempotency-Key, the request's signature was used "
    "before: a signed write without a key is one try, so retry by signing again")

# What the gateway answers when the service it calls fails it.
BAD_GATEWAY = DocumentedError(
    502, "BAD_GATEWAY", "the service failed, or answered what is no answer of its API (the "
    "request may have been carried out)")
SERVICE_UNAVAILABLE = DocumentedError(
    503, "SERVICE_UNAVAILABLE", "the service cannot be reached, or (over gRPC) has as many calls "
    "in hand as it takes, when `Retry-After` comes with it; nothing was done: try again shortly",
    headers=(RETRY_AFTER,))
UPSTREAM_TIMEOUT = DocumentedError(
    504, "UPSTREAM_TIMEOUT", "the service took too long to answer (the request may have been "
    "carried out)")
# Only an operation whose work the service commits (shared.caller_deadline: CALLER_GAVE_UP, the
# service's own, under its code).
UPSTREAM_ROLLED_BACK = DocumentedError(
    504, UpstreamRolledBack.code, "the service could not finish the request before the "
    "gateway's deadline and said it rolled its work back: nothing of it was done, retry it "
    "(with the same Idempotency-Key, if it had one)")
# The gateway's deadline, which every operation of a service takes (shared.caller_deadline):
# read once the identity is verified, so only one the gateway signed gets this far.
INVALID_DEADLINE = DocumentedError(
    400, "INVALID_DEADLINE", f"the {DEADLINE_HEADER} is no moment in seconds since the epoch "
    "(up to 12 digits, and up to 6 decimals): empty, not digits, too long, or given twice")

DATABASE_UNAVAILABLE_OR_BUSY = (DATABASE_UNAVAILABLE, DATABASE_BUSY)
# What every operation of a service's own API can answer besides what every route can
# (shared.http_api): its caller's identity is checked first, then the gateway's deadline, and
# each uses the database.
SERVICE_OPERATION_ERRORS = (MISSING_USER_ID, INVALID_USER_ID, UNTRUSTED_IDENTITY,
                            SIGNATURE_VERSION_MISMATCH, INVALID_DEADLINE,
                            *DATABASE_UNAVAILABLE_OR_BUSY)
# What the operations that honour an Idempotency-Key can answer for it.
IDEMPOTENCY_ERRORS = (INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED, IDEMPOTENCY_KEY_IN_USE)


def kept_under_the_key(error: DocumentedError) -> DocumentedError:
    """`error` as an operation that honours an Idempotency-Key documents it when its operation
    makes it once begun (an account missing, say): kept under the key, and answered again to a
    repeat, Idempotent-Replayed (shared.idempotency)."""
    return replace(error, headers=(*error.headers, REPLAYED_HEADER))


def error_responses(errors: Iterable[DocumentedError]) -> dict[int, dict]:
    """The OpenAPI responses of `errors` by status, lowest first (an error named twice counts
    once): each the error shape, described by the codes it carries, and the headers they come
    with."""
    by_status: dict[int, dict[str, DocumentedError]] = {}
    for error in sorted(errors, key=lambda error: error.status):
        by_status.setdefault(error.status, {}).setdefault(error.code, error)
    return {status: _response(status, list(carried.values()))
            for status, carried in by_status.items()}


def openapi_error_responses(errors: Iterable[DocumentedError]) -> dict[str, dict]:
    """The same as OpenAPI response objects, for a path documented by hand (one no blueprint
    serves: the WebSocket's)."""
    responses = {}
    for status, response in error_responses(errors).items():
        response = dict(response)
        response["content"] = {"application/json": {"schema": response.pop("schema")}}
        responses[str(status)] = response
    return responses


def _response(status: int, errors: list[DocumentedError]) -> dict:
    codes = "\n".join(f"- `{error.code}`: {error.when}" for error in errors)
    response = {"schema": ErrorSchema,
                "description": f"{HTTPStatus(status).phrase}, with `error.code`:\n\n{codes}",
                # The same codes as data, for a client generated from the document.
                "x-error-codes": [error.code for error in errors]}
    headers = {}
    for name, (description, schema) in ANSWER_HEADERS.items():
        answered = [error.code for error in errors if name in error.headers]
        if answered:
            which = "" if len(answered) == len(errors) else f" (with {', '.join(answered)})"
            headers[name] = {"description": f"{description}{which}", "schema": schema}
    if headers:
        response["headers"] = headers
    return response
