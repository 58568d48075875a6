"""Errors with a stable code, and the one JSON shape every HTTP error takes."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from marshmallow import Schema, fields
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from shared.db import CallerGaveUp, cancelled_by_a_limit
from shared.internal_auth import MAX_AGE_SECONDS, MAX_AHEAD_SECONDS


class ApiError(Exception):
    """A failure a client can act on: an HTTP status, a stable code and a readable message."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details if details is not None else {}
        self.headers = headers or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"


class Conflict(ApiError):
    status = 409
    code = "CONFLICT"


class Unprocessable(ApiError):
    status = 422
    code = "UNPROCESSABLE"


class Unauthorized(ApiError):
    status = 401
    code = "UNAUTHORIZED"


class SignatureUsed(Unauthorized):
    """The gateway's signature of an order or deposit without an Idempotency-Key, used before
    (shared.single_use_signatures)."""

    code = "SIGNATURE_USED"

    def __init__(self):
        super().__init__("Identity refused: the identity signature has been used before.")


class UnreadableBody(ApiError):
    """A request body the web server could not read: a chunk of it malformed (gunicorn's chunked
    reader refusing it), say. Where the next request on the connection would start is then
    unknown, so this answer is the connection's last."""

    def __init__(self, refusal: str):
        super().__init__(f"The request body could not be read ({refusal}).",
                         headers={"Connection": "close"})


class BadGateway(ApiError):
    """A service behind the gateway failed to answer."""

    status = 502
    code = "BAD_GATEWAY"

    @classmethod
    def of(cls, service: str) -> BadGateway:
        return cls(f"The {service} service failed to answer.", details={"service": service})

    @classmethod
    def identity_refused(cls, service: str, why: str, code: str | None = None) -> BadGateway:
        """A service refused the identity the gateway signed (401, its error's `code` if it gave
        one): the gateway's fault, never the caller's, whose token the gateway has checked.
        Passed on as a 401, it would tell every caller their token is bad (the page signs out);
        the operator is told instead. A signature used before (SIGNATURE_USED) is no fault of the
        release, the secret or the clocks, and is told as what it is."""
        if code == SignatureUsed.code:
            logging.getLogger(__name__).error(
                "the %s service refused the gateway's signed identity (%s): an unkeyed write's "
                "signature was used twice (a replay: each request the gateway signs has a nonce "
                "of its own)", service, why)
            return cls.of(service)
        logging.getLogger(__name__).error(
            "the %s service refused the gateway's signed identity (%s): are the two of one "
            "release (deployed together), do they share INTERNAL_AUTH_SECRET, and is the "
            "gateway's clock neither %d s behind the service's nor %d s ahead?", service, why,
            MAX_AGE_SECONDS, MAX_AHEAD_SECONDS)
        return cls.of(service)


class ServiceUnavailable(ApiError):
    """A service behind the gateway cannot be reached."""

    status = 503
    code = "SERVICE_UNAVAILABLE"

    @classmethod
    def of(cls, service: str) -> ServiceUnavailable:
        return cls(f"The {service} service is unavailable; try again shortly.",
                   details={"service": service})

    @classmethod
    def too_busy(cls, service: str) -> ServiceUnavailable:
        """The service refused the call unrun: it has as many calls in hand as it takes."""
        return cls(f"The {service} service is too busy just now; try again shortly.",
                   details={"service": service}, headers={"Retry-After": "1"})


class DatabaseUnavailable(ServiceUnavailable):
    """The service cannot use its own database just now (down, restarting, or the connection
    broke); SQLAlchemy has dropped the broken connections, so trying again shortly works."""

    code = "DATABASE_UNAVAILABLE"

    def __init__(self):
        super().__init__("The service cannot reach its database just now; try again shortly.",
                         headers={"Retry-After": "1"})


class DatabaseBusy(ServiceUnavailable):
    """A statement of the request waited too long for a lock, or ran too long, and the database
    cancelled it (shared/db.py: SESSION_LIMITS), and its transaction was rolled back whole; or no
    connection of the pool came free in time, and nothing ran."""

    code = "DATABASE_BUSY"

    def __init__(self):
        super().__init__("The service's database was too busy to finish the request in time; "
                         "nothing was changed. Try again shortly.", headers={"Retry-After": "1"})


# What a request whose database work could not be done raises: the database failed it (or could
# not be reached), or the process's pool had no connection to give in time.
DATABASE_ERRORS = (OperationalError, PoolTimeout)


def database_error(exc: OperationalError | PoolTimeout) -> ServiceUnavailable:
    """What a request whose database work failed with `exc` answers: busy, or unavailable."""
    if isinstance(exc, PoolTimeout) or cancelled_by_a_limit(exc):
        return DatabaseBusy()
    return DatabaseUnavailable()


class UpstreamTimeout(ApiError):
    """A service behind the gateway did not answer in time."""

    status = 504
    code = "UPSTREAM_TIMEOUT"

    @classmethod
    def of(cls, service: str) -> UpstreamTimeout:
        # (Every route's: a read's, an unkeyed write's, POST /api/accounts' that honours no key;
        # worded as UpstreamRolledBack's.)
        return cls(f"The {service} service took too long to answer; the request may still have"
                   " taken effect. Retry it (with the same Idempotency-Key, if it had one).",
                   details={"service": service})


class CallerDeadlinePassed(ApiError):
    """The caller stopped waiting (its deadline passed, shared/caller_deadline.py) before the
    request's work could commit: it was rolled back. Never a replay's: a request that found the
    answer stored under its Idempotency-Key commits nothing new, and is answered that answer
    (shared.db.nothing_new_to_commit)."""

    status = 504
    code = "CALLER_GAVE_UP"

    def __init__(self):
        super().__init__("The caller's deadline passed before the request's work could commit;"
                         " that work was rolled back.")


class UpstreamRolledBack(ApiError):
    """A service behind the gateway said it rolled the request's work back, the gateway's
    deadline having passed before it could commit (its CALLER_GAVE_UP): the gateway's 504 under
    the service's code, which, unlike UpstreamTimeout's, says that nothing of it was done. Exactly
    so: the service found no answer stored under the request's Idempotency-Key (a replay is
    answered whenever it ends), and rolled back its own work. Retried under the same key, a send
    of it still on its way, should one be carried out yet, is found."""

    status = 504
    code = CallerDeadlinePassed.code

    @classmethod
    def of(cls, service: str) -> UpstreamRolledBack:
        return cls(f"The {service} service could not finish the request before the gateway's"
                   " deadline and rolled it back: nothing of it was done. Retry it (with the"
                   " same Idempotency-Key, if it had one).", details={"service": service})


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


# The code and message of an error nobody foresaw (the details would be ours, not the client's).
INTERNAL_ERROR = ("INTERNAL_ERROR", "Something went wrong on our side.")


def code_for(reason: str) -> str:
    """An HTTP status's name as an error code: "Request URI Too Long" is REQUEST_URI_TOO_LONG."""
    return (reason or "error").upper().replace(" ", "_").replace("-", "_").replace("'", "")


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={
        "description": "Stable, for programs: VALIDATION_ERROR, ORDER_NOT_FOUND, ..."})
    message = fields.String(required=True, metadata={"description": "Readable, for people"})
    details = fields.Dict(required=True, metadata={
        "description": "What it concerns: for a 422, the messages by location and field"})


class ErrorSchema(Schema):
    """The one shape of every error, as the OpenAPI document describes each error response (the
    document's default would be flask-smorest's own shape, which no answer here has)."""

    error = fields.Nested(ErrorBodySchema, required=True)


def register_error_handlers(app: Flask) -> None:
    """Turn every error into `{"error": {"code", "message", "details"}}` with its 4xx/5xx status."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return jsonify(error_body(exc.code, exc.message, exc.details)), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        # webargs puts validation messages on exc.data; flask-smorest would otherwise answer with
        # its own shape.
        data = getattr(exc, "data", None) or {}
        messages = data.get("messages")
        if exc.code == 422 and messages is not None:
            body = error_body("VALIDATION_ERROR", "The request is not valid.", messages)
        elif exc.code == 400 and messages is not None:
            body = error_body("MALFORMED_REQUEST", "The request body is not valid JSON.", messages)
        else:
            body = error_body(code_for(exc.name), exc.description or exc.name)
        response = jsonify(body)
        response.status_code = exc.code or 500
        # The exception's own headers (a 405's Allow, a 416's Content-Range), but for the body's.
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers[name] = sorted_methods(value)
            elif name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        for name, value in (data.get("headers") or {}).items():
            response.headers[name] = value
        return response

    def _database_unavailable(exc: OperationalError | PoolTimeout):
        app.logger.warning("database unavailable or busy: %s", getattr(exc, "orig", exc))
        return _api_error(database_error(exc))

    for error in DATABASE_ERRORS:
        app.register_error_handler(error, _database_unavailable)

    @app.errorhandler(CallerGaveUp)
    def _caller_gave_up(_exc: CallerGaveUp):
        app.logger.warning("the caller's deadline passed before the request's work could commit;"
                           " rolled back")
        return _api_error(CallerDeadlinePassed())

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return jsonify(error_body(*INTERNAL_ERROR)), 500


def sorted_methods(allow: str) -> str:
    """An Allow header's methods in one order: Flask and Werkzeug list them from a set, in an
    order that changes from one process to the next."""
    return ", ".join(sorted(method.strip() for method in allow.split(",")))
