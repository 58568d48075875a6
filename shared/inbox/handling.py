"""Stored messages handled, each once: locked in order, handled, failed tries counted, parked."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.contracts import (PAYLOAD_SCHEMAS, MalformedMessage, declared_fields, decode,
                              knows_envelope_version)
from shared.db import (after_commit_undone_if_it_raises, connection_lost, connection_lost_on,
                       database_now, driver_cursor, held_up_by_a_lock, refuse_if_aborted,
                       refuse_if_rolled_back, said_in_a_line)
from shared.inbox.committed_lines import say_once_committed
from shared.inbox.model import InboxMessage
from shared.outbox.writing import outbox_rows_written_together
from shared.request_context import request_id_bound, request_ids_bound

log = logging.getLogger(__name__)


class PermanentMessageError(Exception):
    """The message can never succeed (it names an unknown order, say): park it without retrying."""


class ConnectionLostInHandler(Exception):
    """The database connection was lost while a message's handler ran, once its savepoint was
    made and up to its release or rollback: an outage's doing, or the handler's own (one that ends
    its session, or hangs until PostgreSQL ends it), which look the same. The transaction is lost
    with it, and nothing of the try could be written (a message's own task records it on a fresh
    connection). Told by the error the connection was noted lost with (shared.db:
    connection_lost_on), whatever the handler then did: let it out, caught it and raised its own
    (a PermanentMessageError, say), ran on into the session's own (PendingRollbackError: its
    transaction is gone), or returned as if it had handled the message."""

    def __init__(self, message_id: uuid.UUID, error: BaseException):
        super().__init__(f"the database connection was lost while the handler of {message_id}"
                         f" ran ({said_in_a_line(error)})")
        self.message_id = message_id
        self.error = error  # the lost connection's, the driver's or SQLAlchemy's around it


@dataclass(frozen=True)
class StoredMessage:
    """What handling needs of a stored message whose row the caller's transaction has locked."""

    message_id: uuid.UUID
    type: str | None
    correlation_id: str | None
    request_id: str | None
    payload: dict[str, Any] | None  # as stored: JSON, not yet loaded by its contract's schema
    done: bool  # processed or parked already
    envelope_version: int | None  # (None: a record never parsed)
    # The message's text, kept where its envelope was not read whole as it was stored (a version
    # this reader did not know, or garbage): read again, as a fresh read would, before handling.
    raw_value: str | None = None


@dataclass(frozen=True)
class ReceivedEvent:
    """A stored message as its handler gets it: the payload, loaded by its contract's schema, and
    the message (id, type, envelope version, correlation and request ids)."""

    payload: dict[str, Any]
    message: StoredMessage

    def wire_payload(self) -> dict[str, Any]:
        """The payload in its contract's wire form (amounts as strings of two decimals, ids as
        written), whatever form it was stored in: the consumer stores it so, but a payload parked
        as a newer producer sent it, then replayed, is kept as it came (a number for an amount,
        an id in capitals)."""
        return PAYLOAD_SCHEMAS[self.message.type].dump(self.payload)


# A handler gets a run of messages of the types it is registered for, in the order they are to be
# handled (by Kafka key, then by their place in the partition), and handles them all in the
# caller's transaction, set-based where it can: a run costs its statements once, not once per
# message. When a batch is retried message by message, each run holds one message.
Handler = Callable[[Session, list[ReceivedEvent]], None]


class Outcome(Enum):
    PROCESSED = "processed"
    ALREADY_DONE = "already_done"
    PARKED = "parked"
    MISSING = "missing"
    # A failed try's message, handed over again since (by the sweeper, or to another task of it).
    HANDED_OVER = "handed_over"


def process_inbox_message(
    session: Session, message_id: uuid.UUID, handlers: dict[str, Handler]
) -> Outcome:
    """Handle one stored message in the caller's transaction, at most once.

    The row is locked first, so two workers handed the same id run one after the other and the
    second finds it already processed. The handler's effects, any outbox rows it writes and the
    processed mark commit together.
    """
    locked = lock_in_order(session, [message_id])
    if not locked:
        return Outcome.MISSING
    return handle_locked_message(session, locked[0], handlers)


def lock_in_order(session: Session, message_ids: list[uuid.UUID]) -> list[StoredMessage]:
    """Lock and load the messages, sorted by Kafka key, then by their place in the partition.

    Handlers lock what belongs to a key (a user's account, say). Batches handled at the same time
    that take their locks in one global order (these rows first, then what the handlers lock, key
    by key) cannot deadlock each other, and a batch handles one key's messages in the order they
    were sent (two batches handled at once can still commit one key's messages in either order).
    """
    # (A payload's numbers with a point read back as Decimals, as the consumer read them:
    # shared.db. Valid payloads hold none, amounts being strings; a refused payload replayed may:
    # storing._jsonb_text.)
    with driver_cursor(session) as cursor:
        cursor.execute(_LOCK_IN_ORDER, ([str(message_id) for message_id in message_ids],))
        return [StoredMessage(uuid.UUID(message_id), *rest) for message_id, *rest in cursor]


@dataclass(frozen=True)
class MarkedBatch:
    """Messages locked by lock_in_order_marking_processed, marked processed already: what
    handle_locked_messages_at_once takes, and all it takes. It marks nothing itself, so rows
    locked by lock_in_order alone, handed to it, would be handled and left unmarked, to be
    handled again on the next dispatch; this type keeps them from it, as long as only
    lock_in_order_marking_processed makes one (a MarkedBatch built by hand around other rows
    would pass the check all the same)."""

    messages: tuple[StoredMessage, ...]  # as locked, `done` as before the mark


def lock_in_order_marking_processed(session: Session, message_ids: list[uuid.UUID]) -> MarkedBatch:
    """lock_in_order, and in the same statement every message neither processed nor parked yet
    marked processed, as handle_locked_messages_at_once needs them: its batch handles them all, or
    rolls back whole, the marks with it. One statement a batch fewer than marking them after the
    handlers ran. The messages are returned as they were locked, `done` as before the mark; their
    rows' processed_at and last_attempt_at say when the batch took them, before their handlers
    ran."""
    with driver_cursor(session) as cursor:
        cursor.execute(_LOCK_IN_ORDER_MARKING_PROCESSED,
                       {"message_ids": [str(message_id) for message_id in message_ids]})
        return MarkedBatch(tuple(StoredMessage(uuid.UUID(message_id), *rest)
                                 for message_id, *rest in cursor))


# Like the consumer's (storing), the handlers' statements go straight to the driver, on a
# shared.db.driver_cursor: every message passes through them. The times they write are the
# database's clock (shared.db.database_now: the sweeper's, and `received_at`'s), not the worker's:
# clock_timestamp(), read once for a statement that writes it twice, as `clock` in its FROM list.
# What marking a message processed sets (its try counted and closed: see _MARK_PROCESSED), one
# clause for both statements that mark: _MARK_PROCESSED, a message at a time, and the batch's
# _LOCK_IN_ORDER_MARKING_PROCESSED (each with `clock` in its FROM list).
_SET_PROCESSED = ("SET attempts = attempts + 1, last_attempt_at = clock, processed_at = clock,"
                  " last_error = NULL, try_open = false")
# One array parameter (`= ANY`), not an IN list, whatever the batch size.
_LOCK_IN_ORDER = """
SELECT message_id::text, type, correlation_id, request_id, payload,
       processed_at IS NOT NULL OR parked_at IS NOT NULL, envelope_version, raw_value
FROM inbox_messages
WHERE message_id = ANY(%s::uuid[])
ORDER BY key, topic, partition, "offset"
FOR UPDATE"""
# The rows are locked in the order above (the locking CTE's rows are read once, in that order), and
# the UPDATE finds each row locked already by this statement: it waits for nothing more. A row
# another transaction changed before the lock was had is read as that one left it (READ
# COMMITTED's re-read of a locked row), so one it processed meanwhile is `done` and not marked
# again.
_LOCK_IN_ORDER_MARKING_PROCESSED = f"""
WITH locked AS (
    SELECT message_id, type, correlation_id, request_id, payload,
           processed_at IS NOT NULL OR parked_at IS NOT NULL AS done, envelope_version, raw_value,
           key, topic, partition, "offset"
    FROM inbox_messages
    WHERE message_id = ANY(%(message_ids)s::uuid[])
    ORDER BY key, topic, partition, "offset"
    FOR UPDATE),
marked AS (
    UPDATE inbox_messages AS stored
    {_SET_PROCESSED}
    FROM locked, clock_timestamp() AS clock
    WHERE stored.message_id = locked.message_id AND NOT locked.done)
SELECT message_id::text, type, correlation_id, request_id, payload, done, envelope_version,
       raw_value
FROM locked
ORDER BY key, topic, partition, "offset"
"""


def handle_locked_message(session: Session, message: StoredMessage,
                          handlers: dict[str, Handler], max_attempts: int | None = None) -> Outcome:
    """Handle a message whose row the caller's transaction has locked.

    The handler runs in a savepoint: when it raises, what it wrote is undone (and what it asked to
    be done after the commit, shared.db.after_commit, forgotten; a handler that returns having
    caught an error the database raised fails so too, TransactionAborted raised from that error,
    and counts as that error would: not at all for a lock waited on too long), the attempt stays
    counted on the row, with its error, and the exception goes on to the caller (who retries the
    message later); a PermanentMessageError parks the message instead. With `max_attempts` (for a
    caller that commits the count: a batch handling its messages one by one), a failure that uses
    the message's last attempt parks it too, rather than leave it to be tried once more. A
    connection lost while the handler runs counts nothing, parks nothing, and is raised as
    ConnectionLostInHandler, so that the caller knows whose try it lost, even where the handler
    caught the error and raised a PermanentMessageError or returned (one lost elsewhere, as the
    savepoint begins or as the message is marked processed, is raised as it came).
    """
    if message.done:
        return Outcome.ALREADY_DONE
    # (Its id bound for all that is said of it, the lines that park it or say it handled
    # included, each said once committed: they are where the click it was caused by ends.)
    with request_id_bound(message.request_id):
        return _handle_with_its_request_id_bound(session, message, handlers, max_attempts)


def _handle_with_its_request_id_bound(session: Session, message: StoredMessage,
                                      handlers: dict[str, Handler],
                                      max_attempts: int | None) -> Outcome:
    ready = _ready_to_handle(message, handlers)
    if isinstance(ready, str):
        _park(session, [(message, ready)])
        return Outcome.PARKED
    handler, event = ready
    savepoint = session.begin_nested()
    # (The savepoint made now, not with the handler's first statement, as SQLAlchemy would: a
    # connection lost before the handler began is not the handler's loss.)
    connection = session.connection()
    try:
        with after_commit_undone_if_it_raises(session), savepoint:
            handler(session, [event])
            undone = (f"the {message.type} handler caught a database error and returned, what"
                      " it did undone")
            # (Its own savepoint, or one the handler made in it and left open.)
            refuse_if_rolled_back(session.get_nested_transaction() or savepoint, undone)
            refuse_if_aborted(connection, undone)
    except Exception as exc:
        # Lost, whatever the handler made of it: it may have caught the driver's error and
        # raised its own (a PermanentMessageError, say), or run on into the session's.
        lost = connection_lost_on(connection) or _connection_lost_on_the_way(exc)
        if lost is not None:  # (nothing more can be done on the lost transaction)
            raise ConnectionLostInHandler(message.message_id, lost) from exc
        if isinstance(exc, PermanentMessageError):
            _park(session, [(message, str(exc))])
            return Outcome.PARKED
        # A try held up by another session's lock is no fault of the message's: it counts none
        # of its attempts, but is noted, so that the sweeper leaves the message to its retry.
        if held_up_by_a_lock(exc):
            with driver_cursor(session) as cursor:
                cursor.execute(_NOTE_TRY, {"message_id": str(message.message_id)})
            raise
        if _count_failed_attempt(session, message, repr(exc), max_attempts):
            return Outcome.PARKED
        raise
    # (The handler caught the error, and its savepoint's release said nothing, SQLAlchemy having
    # invalidated the connection. A note the release went through after is no loss: a statement
    # the handler ran on a cursor it had closed, say. connection_lost_on drops it.)
    lost = connection_lost_on(connection)
    if lost is not None:
        raise ConnectionLostInHandler(message.message_id, lost)
    _mark_processed(session, [message.message_id])
    _said_handled_once_committed(session, [message])
    return Outcome.PROCESSED


def _connection_lost_on_the_way(exc: BaseException | None) -> BaseException | None:
    """The first error of a lost connection that `exc` was raised from or while handling, or is,
    if any: for a loss no statement of SQLAlchemy's or driver_cursor's met, and so not noted on
    the connection (a handler's bare driver cursor's, let out)."""
    lost, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if connection_lost(exc):
            lost = exc
        exc = exc.__cause__ or exc.__context__
    return lost


def _count_failed_attempt(session: Session, message: StoredMessage, error: str,
                          max_attempts: int | None) -> bool:
    """Count a failed try of a message the transaction has locked, with its error; park it when
    that was its last attempt (of `max_attempts`, if given), said once committed. Returns True
    when it is parked."""
    with driver_cursor(session) as cursor:
        cursor.execute(_COUNT_ATTEMPT, {"message_id": str(message.message_id),
                                        "error": error[:2000], "max_attempts": max_attempts})
        attempts, parked = cursor.fetchone()
    if parked:
        _said_parked_after_attempts(session, message.message_id, message.request_id, attempts,
                                    error)
    return parked


def _said_parked_after_attempts(session: Session, message_id: uuid.UUID, request_id: str | None,
                                attempts: int, error: str) -> None:
    say_once_committed(session, log, logging.ERROR, request_id,
                       "parked inbox message %s after %d attempts: %s", message_id, attempts,
                       error)


def handle_locked_messages_at_once(session: Session, batch: MarkedBatch,
                                   handlers: dict[str, Handler]) -> None:
    """Handle messages that the caller's transaction has locked and marked processed
    (lock_in_order_marking_processed, the one maker of a MarkedBatch), with no savepoints; the
    outbox rows they write go in one INSERT, and one that cannot be handled is parked, its mark
    undone.

    Consecutive messages with the same handler go to it as one run. Nothing can be undone on its
    own here: any exception, PermanentMessageError included, goes to the caller, whose transaction
    must then roll back as a whole (and may handle the messages one by one with
    handle_locked_message). In exchange a run costs its handler's statements and no more.
    """
    if not isinstance(batch, MarkedBatch):
        raise TypeError("handle_locked_messages_at_once takes the MarkedBatch of"
                        f" lock_in_order_marking_processed, not {type(batch).__name__}")
    runs: list[tuple[Handler, list[ReceivedEvent]]] = []
    unusable: list[tuple[StoredMessage, str]] = []
    for message in batch.messages:
        if message.done:
            continue
        ready = _ready_to_handle(message, handlers)
        if isinstance(ready, str):
            unusable.append((message, ready))
            continue
        handler, event = ready
        if runs and runs[-1][0] is handler:
            runs[-1][1].append(event)
        else:
            runs.append((handler, [event]))
    with outbox_rows_written_together(session):
        for handler, events in runs:
            # (What the handler says of a run is said with its messages' request ids.)
            with request_ids_bound(event.message.request_id for event in events):
                handler(session, events)
    _said_handled_once_committed(session, [event.message for _, events in runs
                                           for event in events])
    if unusable:
        _park(session, unusable, marked_processed=True)


def _said_handled_once_committed(session: Session, messages: list[StoredMessage]) -> None:
    """Have each message said handled, with its request id, once the caller's transaction has
    committed (committed_lines)."""
    for message in messages:
        say_once_committed(session, log, logging.INFO, message.request_id, "handled %s %s",
                           message.type, message.message_id)


def _mark_processed(session: Session, message_ids: list[uuid.UUID]) -> None:
    with driver_cursor(session) as cursor:
        cursor.execute(_MARK_PROCESSED, {"message_ids": [str(m) for m in message_ids]})


# Marking processed, counting a failure and parking (_PARK) each end a try of the message, and so
# close its open try (`try_open`: note_try_begun) in the same statement, whichever task noted it:
# a try of another task's that failed and has yet to record it then finds it closed since
# (record_failed_attempt), and leaves the message to this one. (A try held up by a lock, _NOTE_TRY,
# counts nothing and leaves an open try open.)
_MARK_PROCESSED = f"""
UPDATE inbox_messages
{_SET_PROCESSED}
FROM clock_timestamp() AS clock
WHERE message_id = ANY(%(message_ids)s::uuid[])"""
# (`attempts` on the right of SET is the count before this try.)
_COUNT_ATTEMPT = """
UPDATE inbox_messages
SET attempts = attempts + 1, last_attempt_at = clock, last_error = %(error)s, try_open = false,
    parked_at = CASE WHEN attempts + 1 >= %(max_attempts)s THEN clock END
FROM clock_timestamp() AS clock
WHERE message_id = %(message_id)s::uuid
RETURNING attempts, parked_at IS NOT NULL"""
_NOTE_TRY = ("UPDATE inbox_messages SET last_attempt_at = clock_timestamp()"
             " WHERE message_id = %(message_id)s::uuid")


def _park(session: Session, reasons: list[tuple[StoredMessage, str]],
          marked_processed: bool = False) -> None:
    """Park messages whose rows the transaction has locked, each with its reason (said with its
    request id, once committed); `marked_processed`: locked by lock_in_order_marking_processed,
    whose mark (its attempt counted) is undone."""
    with driver_cursor(session) as cursor:
        for message, reason in reasons:
            cursor.execute(_PARK_MARKED if marked_processed else _PARK,
                           {"message_id": str(message.message_id), "reason": reason[:2000]})
            say_once_committed(session, log, logging.ERROR, message.request_id,
                               "parked inbox message %s: %s", message.message_id, reason)


_PARK = """
UPDATE inbox_messages
SET attempts = attempts + 1, last_attempt_at = clock, parked_at = clock,
    last_error = %(reason)s, try_open = false
FROM clock_timestamp() AS clock
WHERE message_id = %(message_id)s::uuid"""
# The same for a message marked processed as its batch locked it, the attempt counted then.
_PARK_MARKED = """
UPDATE inbox_messages
SET processed_at = NULL, parked_at = clock_timestamp(), last_error = %(reason)s
WHERE message_id = %(message_id)s::uuid"""


def _ready_to_handle(message: StoredMessage,
                     handlers: dict[str, Handler]) -> tuple[Handler, ReceivedEvent] | str:
    """The message's handler and the event to give it, or why the message must be parked: an
    envelope a fresh read of its text would refuse (a version this reader did not know as it was
    stored, kept as its text, then replayed), an envelope version this reader does not know, no
    handler, or a payload that breaks its contract."""
    if message.raw_value is not None:
        # Never looser than a fresh read: the whole envelope read, as the consumer reads one.
        try:
            envelope = decode(message.raw_value.encode("utf-8"))
        except MalformedMessage as exc:
            return str(exc)
        message = replace(message, envelope_version=envelope.version,
                          payload=envelope.payload_json())
    if not knows_envelope_version(message.envelope_version):
        return f"envelope version {message.envelope_version} is not one this reader knows"
    handler = handlers.get(message.type)
    if handler is None:
        return f"no handler for message type {message.type!r}"
    try:
        payload = PAYLOAD_SCHEMAS[message.type].load(message.payload)
    except Exception as exc:  # stored before the contract changed, or edited by hand
        return f"payload breaks the contract: {exc}"
    declared = declared_fields(message.type)
    if not message.payload.keys() <= declared:
        # Stored as sent (parked, refused, then replayed): the handler sees, as with any message
        # the consumer stored, only the fields the contract declares (shared/contracts.py).
        message = replace(message, payload={
            name: value for name, value in message.payload.items() if name in declared})
    return handler, ReceivedEvent(payload, message)


@dataclass(frozen=True)
class BegunTry:
    """A try noted as begun: when (as noted), and the request id of the message it is a try of,
    which the task trying it says all it says of it with."""

    at: datetime
    request_id: str | None


def note_try_begun(session: Session, message_id: uuid.UUID) -> BegunTry | None:
    """Note, in a transaction of its own committed before the try, that a try of the message
    begins (`try_open`, and `last_attempt_at`): should the try never end (its worker crashes, or
    hangs), the sweeper, handing the message over again, counts it as an attempt. Its end, or
    that of another handler's try of the message, closes it: the message processed or parked, or
    a failure recorded (record_failed_attempt) or counted. Nothing is noted while another handler
    holds the row (that one is at work on it), nor of a message processed or parked.

    Returns when the try began, as noted (its `at` for record_failed_attempt), with the message's
    request id, or None if it was not noted."""
    with driver_cursor(session) as cursor:
        cursor.execute(_NOTE_TRY_BEGUN, {"message_id": str(message_id)})
        noted = cursor.fetchone()
    return BegunTry(*noted) if noted else None


_NOTE_TRY_BEGUN = """
UPDATE inbox_messages SET try_open = true, last_attempt_at = clock_timestamp()
WHERE message_id = (SELECT message_id FROM inbox_messages
                    WHERE message_id = %(message_id)s::uuid
                          AND processed_at IS NULL AND parked_at IS NULL
                    FOR UPDATE SKIP LOCKED)
RETURNING last_attempt_at, request_id"""


def count_messages_due(cursor) -> int:
    """How many stored messages are yet to be handled and not waiting out a failed try's backoff
    (a failure recorded, its try closed: record_failed_attempt) nor parked: those never tried,
    and those in a try now (one held up by a lock included: it records no failure). For
    devstack's drain at a stop, which waits for these."""
    cursor.execute("SELECT count(*) FROM inbox_messages WHERE processed_at IS NULL"
                   " AND parked_at IS NULL AND (try_open OR last_error IS NULL)")
    return cursor.fetchone()[0]


def record_failed_attempt(
    session: Session, message_id: uuid.UUID, error: str, max_attempts: int,
    counted: bool = True, try_began_at: datetime | None = None,
) -> Outcome | None:
    """Note a failed try in its own transaction, as one of the message's attempts unless not
    `counted` (held up by another session's lock: then its error replaces none the message's own
    tries left, which an operator reading a parked message wants to see); park the message once
    it has used them all (said once the caller's transaction has committed).

    A try noted as begun (`try_began_at`, from note_try_begun) can find itself closed since by
    another, between the try's rollback and this record: the sweeper, which took it for lost
    (once it ran past the sweep's minimum age), counted it and handed the message over again; or
    another task of the message (a batch handling it one by one, say), whose own try of it ended
    meanwhile, counted if it failed, and which goes on with it. It is not counted twice then, only
    its error kept, and the message is left to that other; or, if the message was parked
    meanwhile (by the sweeper, for that lost try, or by another task), the error is added to the
    one it was parked with. A try not noted as begun (another's try held the row, or the note
    failed) that finds the message parked leaves its error out: it may never have reached the
    handler, nor can it tell whether the message was parked before it began; its task's line
    says it.

    Returns Outcome.PARKED when the message is now parked (by this record or before it: the
    caller is not to retry it either way), Outcome.ALREADY_DONE when it was handled meanwhile,
    Outcome.HANDED_OVER when it was handed over again meanwhile, and None when the caller is to
    retry it.
    """
    message = session.scalars(
        select(InboxMessage).where(InboxMessage.message_id == message_id).with_for_update()
    ).one_or_none()
    if message is None:
        return None
    if message.processed_at is not None:
        # (Handled meanwhile, by another task of it, or by this try itself, its COMMIT's answer
        # lost: a retry would only find it so.)
        return Outcome.ALREADY_DONE
    # The try closed, and the time it wrote overwritten, by another since. Its count and its
    # mark of the handing over stand.
    closed_since = (try_began_at is not None and not message.try_open
                    and message.last_attempt_at != try_began_at)
    if message.parked_at is not None:
        # (Only a replay hands a parked message on, dispatching it itself: a retry would find it
        # parked.)
        if closed_since:
            message.last_error = "; ".join(filter(None, [message.last_error,
                                                         f"last try: {error}"]))[:2000]
        return Outcome.PARKED
    # (Read once the row is locked, and before it is changed: a read after would flush the
    # changes before it in an UPDATE of their own.)
    now = database_now(session)
    if counted or message.last_error is None:  # (a lock waited on says nothing of the message)
        message.last_error = error[:2000]
    if closed_since:
        return Outcome.HANDED_OVER
    message.attempts += 1 if counted else 0
    message.last_attempt_at = now
    message.try_open = False
    if counted and message.attempts >= max_attempts:
        message.parked_at = now
        _said_parked_after_attempts(session, message_id, message.request_id, message.attempts,
                                    error)
        return Outcome.PARKED
    return None
