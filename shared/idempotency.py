"""`Idempotency-Key` support for POST endpoints: a retry with the same key and body gets the first
response back and changes nothing; the same key with a different body is refused with a 422. The
orders and payments services keep the keys (SERVICES_KEEPING_IDEMPOTENCY_KEYS); the gateway checks
a key and passes it on to them, and keeps none.

The first response's body is kept as the JSON text it was answered with (`response_text`), which a
replay reads back into the same values in the same order: its answer is the first one's, byte for
byte (the bodies hold strings, whole numbers and nulls, as the schemas dump them, which read back
as they were; jsonb, which kept the body alone before, orders an object's keys by their length).
The body is kept as jsonb as well (`response_body`), for the processes of the release before
this one, which read only that during an upgrade, and is read from there for the keys they kept.
A later release writes only the text and drops that column, once every key kept has its text (a
day on: IDEMPOTENCY_KEY_RETENTION_SECONDS), rather than rewrite the table under its lock.

A replayed answer says so: `take_replayed_mark()` tells the transport, which answers it with
`Idempotent-Replayed: true` (REPLAYED_HEADER, as Stripe names it; in a gRPC call's trailers), so
that a client can tell a retry's answer from a fresh one (did the money move now, or the first
time?). A fresh answer has no such header. The retry need not be the client's: a keyed POST the
gateway sent again (its connection closed unanswered, over either transport:
gateway_app/resends.py) is answered "replayed" when the first send of this same request did the
work, though the client sent it once.

The key is recorded in the same transaction as the work it guards, so a request that fails leaves no
key behind, and two concurrent requests with one key run one after the other: the second waits on
the first one's insert and then reads its stored response, if the first commits (or rolls back)
within lock_timeout (shared/db.py: SESSION_LIMITS, 2 s). Past it the second is answered 503
IDEMPOTENCY_KEY_IN_USE (KeyInUse, with Retry-After), not DATABASE_BUSY's "nothing was changed": the
key is held by another transaction, most likely the first request under it, under way still, which
may yet commit, so the client retries under the same key, and is answered the first's answer once it
has (a gateway's own second try of a keyed POST is likeliest to meet it: gateway_app/resends.py).
(Less likely, the key's INSERT waited on the pruner's uncommitted DELETE of an expired row under the
same key, or on a migration's lock: nothing under the key is then under way, and the retry is
carried out.) A refusal the operation itself makes once it has begun (a 4xx its use case raises: a
top-up's 404 ACCOUNT_NOT_FOUND or 422 BALANCE_LIMIT_EXCEEDED) is an answer as a success is, and is
kept and replayed alike (the same status and body, said replayed): its work rolls back whole, and
the key is then recorded with the refusal in a short transaction of its own, so that a top-up
refused for want of an account, retried under its key once the account is open, is answered its 404
again, not carried out. As Stripe keeps a result "only if an API endpoint started executing", what
refuses a request before its operation runs keeps nothing: its body invalid (400, 422
VALIDATION_ERROR), its key or its identity (400, 401), its media type (415), a limit (429), and any
failure (503, 504 CALLER_GAVE_UP, 5xx); its retry, a corrected body under the same key included, is
carried out. A refusal's row keeps its request's fingerprint marked (_REFUSAL_MARK), so that a
process of the release before this one, which kept no refusal and would answer one's body with its
operation's success status, refuses a retry under its key 422 IDEMPOTENCY_KEY_REUSED instead. A key
is kept for IDEMPOTENCY_KEY_RETENTION_SECONDS (a day, by default), then pruned
(`prune_expired_keys`, run by beat): a client retries within that, and the same key later is a new
request.

A replay is answered whenever it ends, the caller's deadline passed or not (shared.db:
nothing_new_to_commit): it commits nothing new, and the work it answers for is done. Rolled back
for the deadline, it was the service's 504 CALLER_GAVE_UP, which the gateway tells its client as
"nothing of it was done", with the order placed (a retry after an answer lost, or after a 504
UPSTREAM_TIMEOUT, that waited on the first request's key or found it late). So a CALLER_GAVE_UP
comes only from a request that found no answer stored under its key, the first request's insert
waited out, and rolled its own work back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flask import Response as HttpResponse
from flask import current_app, g, request
from sqlalchemy import DateTime, Index, Integer, String, Text, func, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.cache import invalidate_after_commit
from shared.db import (after_commit, db, delete_oldest_before, held_up_by_a_lock,
                       nothing_new_to_commit, transaction)
from shared.errors import ApiError, ServiceUnavailable, Unprocessable, error_body
from shared.internal_auth import IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_HEADER
from shared.jsonio import loads_strict
from shared.single_use_signatures import refuse_a_used_signature

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
# The header as the OpenAPI documents of the routes that honour it describe it: what
# checked_idempotency_key takes, as sent. Its spaces and tabs at the ends are stripped before the
# key is read or counted, so the pattern takes any number of them there, around 1 to
# MAX_KEY_LENGTH printable ASCII characters but a comma that begin and end with other than a
# space (no minLength or maxLength, which would count them too: " " was valid by them and
# refused, 255 characters padded with a space taken and refused by them).
_KEY_CHARACTER, _KEY_END = r"[\x20-\x2B\x2D-\x7E]", r"[\x21-\x2B\x2D-\x7E]"
IDEMPOTENCY_KEY_PARAMETER = {
    "in": "header", "name": IDEMPOTENCY_HEADER, "required": False,
    "schema": {"type": "string",
               "pattern": rf"^[ \t]*{_KEY_END}(?:{_KEY_CHARACTER}{{0,{MAX_KEY_LENGTH - 2}}}"
                          rf"{_KEY_END})?[ \t]*$"},
    "description": "A retry with the same key and body within a day returns the first response"
                   " (status and body, with `Idempotent-Replayed: true`), a refusal the operation"
                   " made once begun too (a top-up's 404 `ACCOUNT_NOT_FOUND` is answered again"
                   " once the account is open); one refused before it ran (an invalid body, 401,"
                   " 415, 429) or that failed (5xx, 504) keeps nothing, and its retry is carried"
                   " out afresh. The same key with another body is a 422"
                   " `IDEMPOTENCY_KEY_REUSED`."
                   f" 1 to {MAX_KEY_LENGTH} printable ASCII characters but a comma, not all"
                   " spaces, given once (400 INVALID_IDEMPOTENCY_KEY otherwise: the header given"
                   " twice reaches the server joined by a comma). Spaces and tabs at its ends are"
                   " no part of the key, nor counted: ` k ` is the key `k`. A key is the caller's"
                   " and this operation's: the same key on another keyed operation is a request of"
                   " its own."}

REPLAYED_HEADER = "Idempotent-Replayed"
REPLAYED = "true"  # its value (and that of the gRPC trailer that carries it)
# The header as the OpenAPI documents of those routes describe it, on their success response (and,
# shared.documented_errors: kept_under_the_key, on those of the refusals their operations make).
REPLAYED_RESPONSE_HEADERS = {REPLAYED_HEADER: {
    "description": f"`true` when this is the answer to an earlier request with the same"
                   f" {IDEMPOTENCY_HEADER} and body, replayed: nothing was done this time."
                   " Absent from a fresh answer.",
    "schema": {"type": "string", "enum": [REPLAYED]}}}
# Where the answer of the request (or gRPC call) under way is marked replayed: its app context.
_REPLAYED_MARK = "hseshop_idempotent_replayed"


class KeyInUse(ServiceUnavailable):
    """The request's key is held by another transaction past lock_timeout: most likely an
    earlier request under the key, under way still (its key recorded, not yet committed), which
    may yet take effect; else the pruner deleting an expired row under the key, or a migration's
    lock, uncommitted. Nothing was done by this one; its retry under the same key is answered the
    earlier one's answer once that has committed (or is carried out, if it rolled back or there
    was none)."""

    code = "IDEMPOTENCY_KEY_IN_USE"

    def __init__(self):
        super().__init__(f"This {IDEMPOTENCY_HEADER} is held by another transaction: most"
                         " likely an earlier request under it, still in progress, which may yet"
                         f" take effect. Retry shortly with the same {IDEMPOTENCY_HEADER}.",
                         headers={"Retry-After": "1"})


class IdempotencyKey(db.Model):
    __tablename__ = "idempotency_keys"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY_LENGTH), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    # The first answer's body: as the JSON text it was answered with, and as jsonb (for the
    # release before, which reads only that; see the module's docstring).
    response_text: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


Response = tuple[Any, int]


def idempotency_key_from_request() -> str | None:
    return checked_idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))


# What an HTTP server strips from both ends of a header's value (RFC 9110 5.5: optional whitespace,
# spaces and tabs), gunicorn among them.
SURROUNDING_WHITESPACE = " \t"
# What the header's lines are joined with when a request gives it more than once: by gunicorn
# (gunicorn.http.wsgi.create), Werkzeug's server and test client, and any proxy that combines
# field lines as RFC 9110 5.3 lets it.
JOINED_BY = ","


def checked_idempotency_key(key: str | None) -> str | None:
    """The key as given, without the spaces and tabs at its ends (None: no key), or a 400 when it
    is not a usable key. An empty one sent is refused, not read as none: a client whose keys came
    out empty believes its retries safe.

    The ends are stripped here, for both transports: over HTTP the server strips them before the
    app sees the header (gunicorn does), so " k" is the key "k" and " " an empty one; over gRPC
    the field arrives as sent, where " " was taken as a key and " k" as another than "k", and a
    call retried over the other transport placed a second order.

    A comma is refused in a key: the header given twice ("a" and "b") reaches the app as one value
    joined by one ("a,b"), and was taken as that key, which neither of the client's was. The WSGI
    environ holds the joined value alone (the server's lines are gone by then: gunicorn's worker
    sees them, Werkzeug's server and a proxy in front need not), so a comma is the only trace of a
    repeat that every server leaves, and a key that holds one is refused as such a repeat would
    be, whoever joined it; over gRPC (a field of the message) as over HTTP."""
    if key is None:
        return None
    key = key.strip(SURROUNDING_WHITESPACE)
    # Printable ASCII, as the gateway's OpenAPI document says (a header's other octets arrive as
    # Latin-1 characters, which a client meaning UTF-8 did not send).
    if (not 1 <= len(key) <= MAX_KEY_LENGTH or not (key.isascii() and key.isprintable())
            or JOINED_BY in key):
        raise ApiError(
            f"{IDEMPOTENCY_HEADER} must be given once, as 1 to {MAX_KEY_LENGTH} printable ASCII"
            " characters but a comma (the header given more than once reaches the server joined"
            " by commas).",
            code="INVALID_IDEMPOTENCY_KEY",
        )
    return key


def fingerprint(args: dict[str, Any]) -> str:
    """A stable hash of the validated request arguments."""
    canonical = json.dumps(args, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_idempotently(*, user_id: str, endpoint: str, key: str | None, args: dict[str, Any],
                     respond: Callable[[Session], Response], invalidates: str) -> Response:
    """Run `respond(session)` in a transaction (its `session`'s), once per (user, endpoint, key);
    replay its answer for a repeated request: a success returned, a refusal kept raised again.

    `endpoint` names the operation ("POST /orders"), whatever transport the request came by.
    `invalidates` is the read cache's namespace the operation changes, which `respond` invalidates
    after the commit (its use case registers that); a replay invalidates it again. The first
    request's invalidation is lost when its process is killed between its commit and its bump
    (one whose COMMIT's answer is lost bumps all the same: shared.db.after_commit), and the retry
    that finds the change must not leave the reads cached from before it.
    A replay marks the answer replayed once its transaction has committed (take_replayed_mark),
    and commits nothing new, which the caller's deadline does not hold back (shared.db:
    nothing_new_to_commit). The key is claimed first in the transaction, so that a replay's
    transaction holds no work of its own.
    A refusal `respond` raises (a 4xx ApiError: the operation's decision, made once it began) is
    kept too, in a transaction of its own once the work's has rolled back (_refusal_kept).
    Without a key, the gateway's signature of the call is taken, once, before the work: a
    captured call sent again is refused 401 SIGNATURE_USED, and so is a try that failed sent
    again (a signed unkeyed write is one try; retry by signing again: shared.single_use_signatures
    says why a failure does not give the signature back)."""
    if key is None:
        with transaction() as session:
            refuse_a_used_signature()
            return respond(session)
    request_hash = fingerprint(args)
    refusal = None
    try:
        with transaction() as session:
            kept = _claimed_or_kept(session, user_id, endpoint, key, request_hash,
                                    {"request_hash": request_hash}, invalidates)
            if kept is None:
                try:
                    body, status = respond(session)
                except ApiError as exc:
                    refusal = exc if _kept_as_an_answer(exc) else None
                    raise
                _keep_answer(session, user_id, endpoint, key, body, status)
                return body, status
    except ApiError as exc:
        if exc is not refusal:
            raise
        kept = _refusal_kept(user_id, endpoint, key, request_hash, refusal, invalidates)
        if kept is None:  # (kept now: this is its first answer)
            raise
    return _answered_again(*kept)


def _kept_as_an_answer(refusal: ApiError) -> bool:
    """Whether `refusal`, raised by an operation run under a key, is kept as its answer: a 4xx,
    the operation's own decision (the account it tops up missing, the balance's limit), made once
    it began; without headers of its own, which a replay would not answer (none of the
    operations' refusals has any). What refuses a request before its operation runs (its body
    invalid, its key, its identity, a limit) keeps nothing, and neither does a failure (a 5xx, a
    database busy or unreachable, the caller's deadline passed): its retry is carried out afresh,
    as Stripe keeps "only if an API endpoint started executing"."""
    return 400 <= refusal.status < 500 and not refusal.headers


def _refusal_kept(user_id: str, endpoint: str, key: str, request_hash: str, refusal: ApiError,
                  invalidates: str) -> Response | None:
    """Keep `refusal` as the answer under the key, in a short transaction of its own (the work's
    has rolled back: nothing of it is kept); None once it is kept. Another request under the key
    may have kept an answer meanwhile (the same request sent twice at once, the second carried out
    as the first's work rolled back): that answer, replayed (or the 422 for another body), as a
    repeat finds it. Past the caller's deadline the refusal is not kept (new work: CallerGaveUp,
    a 504 that says nothing was done), and the retry is carried out afresh."""
    body = error_body(refusal.code, refusal.message, refusal.details)
    with transaction() as session:
        return _claimed_or_kept(session, user_id, endpoint, key, request_hash, {
            "request_hash": _fingerprint_kept(request_hash, refusal.status),
            **_answer_columns(body, refusal.status)}, invalidates)


def _claimed_or_kept(session: Session, user_id: str, endpoint: str, key: str, request_hash: str,
                     row: dict[str, Any], invalidates: str) -> Response | None:
    """Record the key with `row` (its columns: the request's fingerprint, and the answer if it is
    known) and None; or, recorded already, the answer kept under it (body and status) for this
    request, replayed, or a 422 when it was kept for another body; KeyInUse if another
    transaction holds the key (an earlier request under it, under way) past lock_timeout."""
    while not _claim(session, user_id, endpoint, key, row):
        earlier = session.scalars(
            select(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.endpoint == endpoint,
                IdempotencyKey.key == key,
            )
        ).one_or_none()
        if earlier is None:  # pruned as it expired, between the two statements: claim it anew
            continue
        if earlier.request_hash != _fingerprint_kept(request_hash, earlier.response_status):
            raise Unprocessable(
                f"This {IDEMPOTENCY_HEADER} was already used with a different request body.",
                code="IDEMPOTENCY_KEY_REUSED",
            )
        nothing_new_to_commit(session)
        invalidate_after_commit(session, invalidates)
        after_commit(session, _mark_replayed)  # (a commit that fails answers an error instead)
        return _answered_body(earlier), earlier.response_status
    return None


def _keep_answer(session: Session, user_id: str, endpoint: str, key: str, body: Any,
                 status: int) -> None:
    """The answer to the request that claimed the key, kept on its row."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.endpoint == endpoint,
               IdempotencyKey.key == key)
        .values(**_answer_columns(body, status))
    )


def _answer_columns(body: Any, status: int) -> dict[str, Any]:
    """An answer as its row keeps it: its status, its text, and its jsonb (for the release before
    this one: the module's docstring)."""
    return {"response_status": status, "response_text": current_app.json.dumps(body),
            "response_body": body}


# How a refusal's row keeps its request's fingerprint: marked so, the mark in the place of as many
# of the fingerprint's last digits (the column holds 64). A release before this one kept no
# refusal, and answered a kept body with its operation's success status, whatever the row's: it
# would have answered a retry of a top-up refused 404 with a 200 of that error. It compares the
# fingerprint as is and, finding another, refuses the retry 422 IDEMPOTENCY_KEY_REUSED, nothing
# done (during an upgrade, or after a rollback while a refusal is kept).
_REFUSAL_MARK = "refused:"


def _fingerprint_kept(request_hash: str, status: int | None) -> str:
    """The fingerprint `request_hash` as a row answered `status` keeps it (None: not answered
    yet, as it is claimed)."""
    if status is None or status < 400:
        return request_hash
    return _REFUSAL_MARK + request_hash[:len(request_hash) - len(_REFUSAL_MARK)]


def _answered_again(body: Any, status: int) -> Response:
    """A kept answer as it is answered again: a success returned, a refusal raised (the ApiError
    that answers its very body)."""
    if status < 400:
        return body, status
    error = body["error"]
    raise ApiError(error["message"], code=error["code"], details=error["details"], status=status)


def _answered_body(kept: IdempotencyKey) -> Any:
    """The body of the answer `kept`: read from its text, its keys in their order (a JSON object
    read into a dict keeps it); jsonb's values for a key the release before kept."""
    if kept.response_text is None:
        return kept.response_body
    return loads_strict(kept.response_text)


def _mark_replayed() -> None:
    setattr(g, _REPLAYED_MARK, True)


def take_replayed_mark() -> bool:
    """Whether the answer of the request (or gRPC call) under way is one `run_idempotently`
    replayed, its transaction committed; the mark is taken off, so that a later request in the
    same app context (a test's, or a command's) is not taken for a replay."""
    return bool(g.pop(_REPLAYED_MARK, False))


def forget_replayed_mark() -> None:
    """Every app's before_request (shared.app): a mark no transport took (a use case run in an app
    context that requests then share, a test's) is not this request's. (A gRPC call gets an app
    context of its own.)"""
    g.pop(_REPLAYED_MARK, None)


def say_if_replayed(response: HttpResponse) -> HttpResponse:
    """An HTTP answer marked `Idempotent-Replayed: true` if it was replayed (every app's
    after_request: shared.app)."""
    if take_replayed_mark():
        response.headers[REPLAYED_HEADER] = REPLAYED
    return response


def _claim(session: Session, user_id: str, endpoint: str, key: str, row: dict[str, Any]) -> bool:
    """Record the key with `row`, the rest of its columns; False when it is recorded already (by
    a request that has committed: another transaction holding it, one in flight most likely, is
    waited for up to lock_timeout, then KeyInUse, the transaction aborted)."""
    try:
        return session.execute(
            insert(IdempotencyKey)
            .values(user_id=user_id, endpoint=endpoint, key=key, **row)
            .on_conflict_do_nothing()
            .returning(IdempotencyKey.key)
        ).first() is not None
    except OperationalError as exc:
        if held_up_by_a_lock(exc):
            log.warning("a request under an %s waited out lock_timeout on the key, held by"
                        " another transaction (most likely an earlier request under it still"
                        " under way): 503 %s", IDEMPOTENCY_HEADER, KeyInUse.code)
            raise KeyInUse() from exc
        raise


def prune_expired_keys(session: Session, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` keys recorded before `cutoff`, oldest first; returns how many (the
    caller repeats, a transaction each, until fewer than `limit`)."""
    # (Found through ix_idempotency_keys_created_at.)
    return delete_oldest_before(session, table="idempotency_keys", column="created_at",
                                cutoff=cutoff, limit=limit)
