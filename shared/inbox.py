"""The transactional inbox: every message consumed from Kafka is stored once, keyed by its
message id, and then handled exactly once in a transaction that also marks it processed.

A message that cannot be parsed is parked at once (one whose envelope parses, but whose type or
payload this service does not know, with its id and payload, to be replayed once it does); one
whose handler keeps failing is retried and, after `max_attempts` (a try lost with its worker
counts as one, found by the sweeper; a try held up by another session's lock does not), parked
with its last error. Parked messages stay in the table for an operator and never block the
messages behind them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any

from psycopg2.extras import Json, execute_values
from sqlalchemy import (BigInteger, Boolean, DateTime, Index, Integer, String, Text, false, func,
                        select, text, update)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, Session, defer, mapped_column

from shared.contracts import (PAYLOAD_SCHEMAS, Envelope, MalformedMessage, PayloadRefused,
                              declared_fields, decode)
from shared.db import db, driver_cursor, held_up_by_a_lock
from shared.jsonio import dumps_exact
from shared.outbox import outbox_rows_written_together
from shared.request_context import REQUEST_ID_KAFKA_HEADER, request_id_bound

log = logging.getLogger(__name__)

# Ids for records that cannot be parsed: derived from where they sit in Kafka, so a redelivery of
# the same record maps to the same inbox row.
_POSITION_NAMESPACE = uuid.UUID("6f1d1b38-5a53-4a5e-9a57-2a1f5c3e7b11")


class InboxMessage(db.Model):
    __tablename__ = "inbox_messages"

    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    topic: Mapped[str] = mapped_column(String(249))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str | None] = mapped_column(String(255))
    type: Mapped[str | None] = mapped_column(String(100))
    correlation_id: Mapped[str | None] = mapped_column(String(100))
    request_id: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict | None] = mapped_column(JSONB)
    raw_value: Mapped[str | None] = mapped_column(Text)
    # The Kafka record's timestamp: when the sending relay produced it (None if it has none).
    produced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # When a try last began (in a task of its own: note_try_begun) or ended, the sweeper last
    # handed the message over again, or a replay made it as new.
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A try by a task of its own has begun and not ended (a failure recorded, or counted lost).
    try_open: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(
            "ix_inbox_messages_pending",
            "received_at",
            postgresql_where=text("processed_at IS NULL AND parked_at IS NULL"),
        ),
        # For pruning old handled rows (prune_handled_messages).
        Index("ix_inbox_messages_handled", "received_at",
              postgresql_where=text("processed_at IS NOT NULL")),
    )


@dataclass(frozen=True)
class ConsumedRecord:
    """One Kafka record, as the consumer saw it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp: datetime | None = None  # the record's timestamp, if it has one


class PermanentMessageError(Exception):
    """The message can never succeed (it names an unknown order, say): park it without retrying."""


@dataclass(frozen=True)
class StoredMessage:
    """What handling needs of a stored message whose row the caller's transaction has locked."""

    message_id: uuid.UUID
    type: str | None
    correlation_id: str | None
    request_id: str | None
    payload: dict[str, Any] | None  # as stored: JSON, not yet loaded by its contract's schema
    done: bool  # processed or parked already


@dataclass(frozen=True)
class ReceivedEvent:
    """A stored message as its handler gets it: the payload, loaded by its contract's schema, and
    the message (id, type, correlation and request ids)."""

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


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _position_id(record: ConsumedRecord) -> uuid.UUID:
    """The id a record that cannot be parsed is parked under: its position, and a digest of its
    value, so that the record read again is the same row, and another record at the same position
    (a topic deleted and made again starts its offsets at 0) is a row of its own. Not its
    `message_id` header: nothing of such a record can be trusted, and parked under a valid
    message's id it would make the inbox drop that message as a repeat."""
    digest = hashlib.sha256(record.value or b"").hexdigest()
    return uuid.uuid5(_POSITION_NAMESPACE,
                      f"{record.topic}:{record.partition}:{record.offset}:{digest}")


def _storable_text(raw: bytes | str | None, limit: int | None = None) -> str | None:
    """Text from a record as PostgreSQL's text can hold it: bytes that are not UTF-8, a NUL
    character and an unpaired surrogate become replacement characters (the last two would fail
    the batch's insert, and with it every later poll of the partition)."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.replace("\x00", "\ufffd")
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # a surrogate: U+FFFD
    return text[:limit]


def inbox_row(record: ConsumedRecord) -> dict[str, Any]:
    """The inbox row for a record: a parsed event; a parked one, its type or payload refused; or
    a parked row holding the raw value."""
    row = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _storable_text(record.key, 255),
        "request_id": _storable_text(record.headers.get(REQUEST_ID_KAFKA_HEADER) or None, 128),
        "produced_at": record.timestamp,
    }
    try:
        envelope: Envelope = decode(record.value)
    except PayloadRefused as exc:
        try:
            payload = _JsonText(_jsonb_text(exc.envelope["payload"],
                                            numbers_printed_at_most=4 * len(record.value)))
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than it is written)
            return _parked_raw(row, record, exc)
        # Parked under its own id with its payload as sent: once this service knows its type or
        # its payload's new form, a replay hands it to its handler, which reads the payload again
        # (_ready_to_handle). Its offset is committed all the same, so kept only as a raw value,
        # it could never be handled: an order paid for by a newer payments service, say, would
        # stay NEW for ever.
        return row | {
            "message_id": exc.envelope["message_id"],
            "type": exc.envelope["type"],
            "correlation_id": exc.envelope["correlation_id"],
            "payload": payload,
            "parked_at": _now(),
            "last_error": _storable_text(str(exc), 2000),
        }
    except MalformedMessage as exc:
        return _parked_raw(row, record, exc)
    return row | {
        "message_id": envelope.message_id,
        "type": envelope.type,
        "correlation_id": envelope.correlation_id,
        "payload": envelope.payload_json(),
    }


def _parked_raw(row: dict[str, Any], record: ConsumedRecord,
                exc: MalformedMessage) -> dict[str, Any]:
    """A record that cannot be handled as it is, parked as the text it came as."""
    return row | {
        "message_id": _position_id(record),
        "raw_value": _storable_text(record.value),
        "parked_at": _now(),
        "last_error": _storable_text(str(exc), 2000),
    }


# The most a number in a refused payload may hold, in digits and in its exponent: PostgreSQL's
# numeric reads an exponent of at most 1000 (a record's text is parked raw past that).
_LONGEST_NUMBER = 1000


def _jsonb_text(value: Any, numbers_printed_at_most: int) -> str:
    """`value`, a JSON value as the consumer read it (shared.jsonio: a number with a point or an
    exponent a Decimal), as JSON text that jsonb takes, its numbers exact and as long as they were
    sent (a handler reading them again gets the Decimal that was sent: an amount of 10.50 read
    back as a float would break its contract); a ValueError for what would fail the batch's
    insert: a string or key with a NUL character or an unpaired surrogate, or a number past
    numeric's reach; or for numbers PostgreSQL would print back longer, all told, than
    `numbers_printed_at_most` characters (it prints 1e1000 in full: a record of them read back, by
    a replay or a listing, would be a hundred times its size). (A RecursionError: nested deeper
    than it can be checked.)"""
    if _printed_length_of_numbers(value) > numbers_printed_at_most:
        raise ValueError("numbers that PostgreSQL would print back far longer than they came")
    return dumps_exact(value)


def _printed_length_of_numbers(value: Any) -> int:
    """How long PostgreSQL prints back the numbers in `value`, all told (in full, never with an
    exponent); a ValueError for what jsonb cannot take (see _jsonb_text)."""
    if isinstance(value, Decimal):
        digits, exponent = value.as_tuple()[1:]
        if max(len(digits), abs(exponent), abs(value.adjusted())) > _LONGEST_NUMBER:
            raise ValueError("a number past numeric's reach")
        return max(len(digits), value.adjusted() + 1) + max(0, -exponent) + 2
    if isinstance(value, int) and not isinstance(value, bool):
        if len(str(abs(value))) > _LONGEST_NUMBER:
            raise ValueError("a number past numeric's reach")
        return len(str(value))
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("a NUL character")
        value.encode("utf-8")  # an unpaired surrogate: a UnicodeEncodeError, a ValueError
        return 0
    if isinstance(value, list):
        return sum(_printed_length_of_numbers(item) for item in value)
    if isinstance(value, dict):
        return sum(_printed_length_of_numbers(key) + _printed_length_of_numbers(item)
                   for key, item in value.items())
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"not a JSON value: {type(value).__name__}")
    return 0


class _JsonText(Json):
    """JSON already written, for psycopg2 to pass on as it is."""

    def dumps(self, obj: str) -> str:
        return obj


def insert_records(cursor, records: list[ConsumedRecord]) -> list[uuid.UUID]:
    """Insert the records not seen before with one statement on a driver cursor (atomic on its
    own, so the consumer runs it in autocommit: shared/inbox_consumer.py); return the ids of the
    new ones that await handling."""
    if not records:
        return []
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for record in records:
        row = inbox_row(record)
        rows.setdefault(row["message_id"], row)  # a repeat inside one batch is stored once
    values = [(str(row["message_id"]), row["topic"], row["partition"], row["offset"], row["key"],
               row.get("type"), row.get("correlation_id"), row["request_id"],
               _as_json(row.get("payload")), row.get("raw_value"),
               row.get("parked_at"), row.get("last_error"), row["produced_at"])
              for row in rows.values()]
    inserted = execute_values(cursor, _STORE, values, template=_STORED_ROW, page_size=len(values),
                              fetch=True)
    return [uuid.UUID(message_id) for message_id, parked in inserted if not parked]


def _as_json(payload: dict[str, Any] | Json | None) -> Json | None:
    return payload if payload is None or isinstance(payload, Json) else Json(payload)


# The inbox's statements go straight to the driver, as every message passes through them: the
# consumer stores on a psycopg2 connection of its own, the handlers run theirs on a
# shared.db.driver_cursor.
# A record already stored is passed over by a read of the stored ids, which never waits, before the
# insert: an insert meeting a row that a handler's transaction has marked and not yet committed
# waits for it (up to lock_timeout, 2 s, then the whole batch failed and was read again, until the
# handler committed). ON CONFLICT is for two consumers storing one new record at once.
_STORE = """
INSERT INTO inbox_messages (message_id, topic, partition, "offset", key, type, correlation_id,
                            request_id, payload, raw_value, parked_at, last_error, produced_at)
SELECT * FROM (VALUES %s) AS received (message_id, topic, partition, "offset", key, type,
                                        correlation_id, request_id, payload, raw_value, parked_at,
                                        last_error, produced_at)
WHERE NOT EXISTS (SELECT FROM inbox_messages AS stored
                  WHERE stored.message_id = received.message_id)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id::text, parked_at IS NOT NULL"""
# (Typed: the values of a VALUES list read as text where they are not numbers.)
_STORED_ROW = ("(%s::uuid, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s::timestamptz, %s,"
               " %s::timestamptz)")


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
    # (A payload's numbers with a point read back as Decimals, as the consumer read them: shared.db.
    # Valid payloads hold none, amounts being strings; a refused payload replayed may: _jsonb_text.)
    with driver_cursor(session) as cursor:
        cursor.execute(_LOCK_IN_ORDER, ([str(message_id) for message_id in message_ids],))
        return [StoredMessage(uuid.UUID(message_id), *rest) for message_id, *rest in cursor]


# One array parameter (`= ANY`), not an IN list, whatever the batch size.
_LOCK_IN_ORDER = """
SELECT message_id::text, type, correlation_id, request_id, payload,
       processed_at IS NOT NULL OR parked_at IS NOT NULL
FROM inbox_messages
WHERE message_id = ANY(%s::uuid[])
ORDER BY key, topic, partition, "offset"
FOR UPDATE"""


def handle_locked_message(session: Session, message: StoredMessage,
                          handlers: dict[str, Handler], max_attempts: int | None = None) -> Outcome:
    """Handle a message whose row the caller's transaction has locked.

    The handler runs in a savepoint: when it raises, what it wrote is undone, the attempt stays
    counted on the row, with its error, and the exception goes on to the caller (who retries the
    message later); a PermanentMessageError parks the message instead. With `max_attempts` (for a
    caller that commits the count: a batch handling its messages one by one), a failure that uses
    the message's last attempt parks it too, rather than leave it to be tried once more.
    """
    if message.done:
        return Outcome.ALREADY_DONE
    ready = _ready_to_handle(message, handlers)
    if isinstance(ready, str):
        _park(session, {message.message_id: ready})
        return Outcome.PARKED
    handler, event = ready
    try:
        with session.begin_nested(), request_id_bound(message.request_id):
            handler(session, [event])
            log.info("handled %s %s", message.type, message.message_id)
    except PermanentMessageError as exc:
        _park(session, {message.message_id: str(exc)})
        return Outcome.PARKED
    except Exception as exc:
        # A try held up by another session's lock is no fault of the message's: it counts none
        # of its attempts, but is noted, so that the sweeper leaves the message to its retry.
        if held_up_by_a_lock(exc):
            with driver_cursor(session) as cursor:
                cursor.execute(_NOTE_TRY, {"message_id": str(message.message_id), "now": _now()})
            raise
        if _count_failed_attempt(session, message.message_id, repr(exc), max_attempts):
            return Outcome.PARKED
        raise
    _mark_processed(session, [message.message_id])
    return Outcome.PROCESSED


def _count_failed_attempt(session: Session, message_id: uuid.UUID, error: str,
                          max_attempts: int | None) -> bool:
    """Count a failed try of a message the transaction has locked, with its error; park it when
    that was its last attempt (of `max_attempts`, if given). Returns True when it is parked."""
    with driver_cursor(session) as cursor:
        cursor.execute(_COUNT_ATTEMPT, {"message_id": str(message_id), "now": _now(),
                                        "error": error[:2000], "max_attempts": max_attempts})
        attempts, parked = cursor.fetchone()
    if parked:
        log.error("parked inbox message %s after %d attempts: %s", message_id, attempts, error)
    return parked


def handle_locked_messages_at_once(session: Session, messages: list[StoredMessage],
                                   handlers: dict[str, Handler]) -> None:
    """Handle messages whose rows the caller's transaction has locked, with no savepoints, and mark
    them processed with one UPDATE at the end; the outbox rows they write go in one INSERT.

    Consecutive messages with the same handler go to it as one run. Nothing can be undone on its
    own here: any exception, PermanentMessageError included, goes to the caller, whose transaction
    must then roll back as a whole (and may handle the messages one by one with
    handle_locked_message). In exchange a run costs its handler's statements and no more.
    """
    runs: list[tuple[Handler, list[ReceivedEvent]]] = []
    unusable: dict[uuid.UUID, str] = {}
    for message in messages:
        if message.done:
            continue
        ready = _ready_to_handle(message, handlers)
        if isinstance(ready, str):
            unusable[message.message_id] = ready
            continue
        handler, event = ready
        if runs and runs[-1][0] is handler:
            runs[-1][1].append(event)
        else:
            runs.append((handler, [event]))
    processed: list[uuid.UUID] = []
    with outbox_rows_written_together(session):
        for handler, events in runs:
            handler(session, events)
            for event in events:
                with request_id_bound(event.message.request_id):
                    log.info("handled %s %s", event.message.type, event.message.message_id)
                processed.append(event.message.message_id)
    if unusable:
        _park(session, unusable)
    if processed:
        _mark_processed(session, processed)


def _mark_processed(session: Session, message_ids: list[uuid.UUID]) -> None:
    with driver_cursor(session) as cursor:
        cursor.execute(_MARK_PROCESSED, {"message_ids": [str(m) for m in message_ids],
                                         "now": _now()})


_MARK_PROCESSED = """
UPDATE inbox_messages
SET attempts = attempts + 1, last_attempt_at = %(now)s, processed_at = %(now)s, last_error = NULL
WHERE message_id = ANY(%(message_ids)s::uuid[])"""
# (`attempts` on the right of SET is the count before this try.)
_COUNT_ATTEMPT = """
UPDATE inbox_messages
SET attempts = attempts + 1, last_attempt_at = %(now)s, last_error = %(error)s,
    parked_at = CASE WHEN attempts + 1 >= %(max_attempts)s THEN %(now)s END
WHERE message_id = %(message_id)s::uuid
RETURNING attempts, parked_at IS NOT NULL"""
_NOTE_TRY = ("UPDATE inbox_messages SET last_attempt_at = %(now)s"
             " WHERE message_id = %(message_id)s::uuid")


def _park(session: Session, reasons: dict[uuid.UUID, str]) -> None:
    """Park messages whose rows the transaction has locked, each with its reason."""
    with driver_cursor(session) as cursor:
        for message_id, reason in reasons.items():
            cursor.execute(_PARK, {"message_id": str(message_id), "reason": reason[:2000],
                                   "now": _now()})
            log.error("parked inbox message %s: %s", message_id, reason)


_PARK = """
UPDATE inbox_messages
SET attempts = attempts + 1, last_attempt_at = %(now)s, parked_at = %(now)s, last_error = %(reason)s
WHERE message_id = %(message_id)s::uuid"""


def _ready_to_handle(message: StoredMessage,
                     handlers: dict[str, Handler]) -> tuple[Handler, ReceivedEvent] | str:
    """The message's handler and the event to give it, or why the message must be parked: it has
    no handler, or a payload that breaks its contract."""
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


def note_try_begun(session: Session, message_id: uuid.UUID) -> None:
    """Note, in a transaction of its own committed before the try, that a try of the message
    begins (`try_open`, and `last_attempt_at`): should the try never end (its worker crashes, or
    hangs), the sweeper, handing the message over again, counts it as an attempt; a failure
    recorded (record_failed_attempt) ends it. Nothing is noted while another handler holds the
    row: that one is at work on it."""
    with driver_cursor(session) as cursor:
        cursor.execute(_NOTE_TRY_BEGUN, {"message_id": str(message_id), "now": _now()})


_NOTE_TRY_BEGUN = """
UPDATE inbox_messages SET try_open = true, last_attempt_at = %(now)s
WHERE message_id = (SELECT message_id FROM inbox_messages
                    WHERE message_id = %(message_id)s::uuid
                          AND processed_at IS NULL AND parked_at IS NULL
                    FOR UPDATE SKIP LOCKED)"""


def record_failed_attempt(
    session: Session, message_id: uuid.UUID, error: str, max_attempts: int,
    counted: bool = True,
) -> bool:
    """Note a failed try in its own transaction, as one of the message's attempts unless not
    `counted` (held up by another session's lock: then its error replaces none the message's own
    tries left, which an operator reading a parked message wants to see); park the message once
    it has used them all.

    Returns True when the message is now parked.
    """
    message = session.scalars(
        select(InboxMessage).where(InboxMessage.message_id == message_id).with_for_update()
    ).one_or_none()
    if message is None or message.processed_at is not None or message.parked_at is not None:
        return False
    message.attempts += 1 if counted else 0
    message.last_attempt_at = _now()
    message.try_open = False
    if counted or message.last_error is None:  # (a lock waited on says nothing of the message)
        message.last_error = error[:2000]
    if counted and message.attempts >= max_attempts:
        message.parked_at = _now()
        log.error("parked inbox message %s after %d attempts: %s",
                  message_id, message.attempts, error)
        return True
    return False


# Stalled messages one sweep hands back at most. Each is marked as it is, so the next sweeps leave
# it to that dispatch: a sweep need not stop at what the handlers get through before the next one
# (after Redis was down a minute, thousands wait; 500 a sweep took minutes to catch up).
SWEPT_PER_RUN = 5_000


@dataclass(frozen=True)
class StalledMessage:
    """A message the sweeper hands over again, and its tries so far (a try of it lost with its
    worker counted)."""

    message_id: uuid.UUID
    attempts: int


def claim_stalled_messages(session: Session, min_age: timedelta, max_attempts: int | None,
                           limit: int = SWEPT_PER_RUN) -> list[StalledMessage]:
    """Messages still waiting to be handled, stored and last tried or handed over (if ever) over
    `min_age` ago: their dispatch was lost, or their try or retries with their worker; oldest
    first. Each is marked handed over now (`last_attempt_at`, as replaying a parked message marks
    it), so it comes back only if this dispatch is lost too. A row a handler holds locked is left
    to it.

    With `max_attempts` given, a try that began (a task of the message's own notes it:
    note_try_begun) and never ended counts as an attempt, once: its handling crashed its worker
    (or hung it until PostgreSQL ended the transaction, shared.db's SESSION_LIMITS) and recorded
    no failure, and would otherwise be handed over, and crash a worker, every sweep for ever. One
    that reaches `max_attempts` so is parked instead (and not returned), its last error kept.
    Nothing else is counted: a task that never began may wait in a worker's memory yet (taken
    from the queue ahead of its turn), or have been lost with a worker that crashed for another
    message's sake. Without `max_attempts` (while dispatched tasks wait in the queue), nothing is
    counted, and an open try stays on record for a later sweep.
    """
    now = _now()
    claimed = session.execute(_CLAIM_STALLED, {
        "cutoff": now - min_age, "now": now, "limit": limit,
        "counting": 1 if max_attempts else 0, "max_attempts": max_attempts or 0,
        "gave_up": _GAVE_UP.format(max_attempts)})
    stalled = []
    for message_id, attempts, parked in claimed:
        if parked:
            log.error("parked inbox message %s: %s", message_id, _GAVE_UP.format(attempts))
        else:
            stalled.append(StalledMessage(message_id, attempts))
    return stalled


_GAVE_UP = ("tried {} times and never handled: its handling may crash or hang the worker (its"
            " tries were lost with it)")
# `lost`: a try that began and never ended, counted (and so closed) when sweeping with `counting`.
_CLAIM_STALLED = text("""
WITH stalled AS (
    SELECT message_id, CASE WHEN :counting = 1 AND try_open THEN 1 ELSE 0 END AS lost
    FROM inbox_messages
    WHERE processed_at IS NULL AND parked_at IS NULL AND received_at < :cutoff
          AND (last_attempt_at IS NULL OR last_attempt_at < :cutoff)
    ORDER BY received_at LIMIT :limit
    FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE inbox_messages
    SET last_attempt_at = :now, attempts = inbox_messages.attempts + stalled.lost,
        try_open = inbox_messages.try_open AND stalled.lost = 0,
        parked_at = CASE WHEN stalled.lost = 1 AND inbox_messages.attempts + 1 >= :max_attempts
                         THEN :now END,
        last_error = CASE
            WHEN stalled.lost = 1 AND inbox_messages.attempts + 1 >= :max_attempts
            THEN left(:gave_up || coalesce('; last error: ' || inbox_messages.last_error, ''), 2000)
            ELSE inbox_messages.last_error END
    FROM stalled
    WHERE inbox_messages.message_id = stalled.message_id
    RETURNING inbox_messages.message_id, inbox_messages.received_at, inbox_messages.attempts,
              inbox_messages.parked_at IS NOT NULL AS parked)
SELECT message_id, attempts, parked FROM claimed ORDER BY received_at""")


def parked_messages(session: Session, limit: int) -> list[InboxMessage]:
    """The most recently parked messages, newest first."""
    return list(session.scalars(
        select(InboxMessage).where(InboxMessage.parked_at.is_not(None))
        .options(defer(InboxMessage.payload), defer(InboxMessage.raw_value))  # (not listed)
        .order_by(InboxMessage.parked_at.desc()).limit(limit)))


def unpark_messages(session: Session, message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Clear the park, and the attempts, of parked messages that hold an event (of all of them when
    `message_ids` is None), so that they are handled again as if new; returns their ids.

    The caller dispatches them. Their last attempt counts from now, so the sweeper leaves them to
    that dispatch for a while and takes them up only if it was lost. A record that could not be
    parsed holds no event to hand a handler, and stays parked.
    """
    return _update_parked(session, message_ids, InboxMessage.payload.is_not(None),
                          parked_at=None, attempts=0, last_attempt_at=_now(), try_open=False)


def discard_parked_messages(session: Session,
                            message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Give up on parked messages (every one when `message_ids` is None), never to be handled;
    returns their ids.

    The row stays, marked processed with the error that parked it kept, so that the message,
    should Kafka deliver it again, is dropped as a repeat; it is pruned a retention after the
    discard (prune_handled_messages).
    """
    return _update_parked(session, message_ids, parked_at=None, processed_at=_now(),
                          last_error="discarded by an operator; parked for: "
                          + func.coalesce(InboxMessage.last_error, ""))


def _update_parked(session: Session, message_ids: list[uuid.UUID] | None, *conditions,
                   **values) -> list[uuid.UUID]:
    """Set `values` on the parked messages named (every one when `message_ids` is None) that meet
    `conditions`; returns their ids."""
    query = (update(InboxMessage).where(InboxMessage.parked_at.is_not(None), *conditions)
             .values(**values).returning(InboxMessage.message_id))
    if message_ids is not None:
        query = query.where(InboxMessage.message_id.in_(message_ids))
    return list(session.scalars(query.execution_options(synchronize_session=False)))


def prune_handled_messages(session: Session, cutoff: datetime, limit: int) -> int:
    """Delete the rows of up to `limit` handled messages stored, and handled, before `cutoff`,
    oldest first; returns how many (the caller repeats, a transaction each, until fewer than
    `limit`). A message is mostly handled moments after it is stored; one handled late (replayed
    after a park, say) keeps its row a whole retention from its handling, and one discarded
    (discard_parked_messages) from its discard: it was never handled, and no business key would
    make its coming again a no-op. (Such rows stay at the old end of the index the rows are found
    by, and each run passes over them until their time comes.)

    The inbox's own dedup of a message lasts as long as its row. Kafka may deliver a message
    again later than that (it deletes records a segment at a time, so a record can outlive its
    topic's retention, and a group whose offsets expired starts again from the earliest), and
    then it is stored and handled anew: the handlers' business keys make that a no-op (one
    payment per order, a final order status never changes, one notification per message).
    Parked messages are kept, for an operator.
    """
    result = session.execute(_PRUNE, {"cutoff": cutoff, "limit": limit})
    return result.rowcount


# The rows by their physical place (ctid), found through ix_inbox_messages_handled: deleting by id
# instead let the planner join a whole-table scan to the ids. The condition is checked again on
# the rows reached: a row updated meanwhile is reached in its new version, which the inner query
# never saw.
_PRUNE = text("""
DELETE FROM inbox_messages
WHERE ctid = ANY(ARRAY(
          SELECT ctid FROM inbox_messages
          WHERE received_at < :cutoff AND processed_at IS NOT NULL AND processed_at < :cutoff
          ORDER BY received_at
          LIMIT :limit))
  AND received_at < :cutoff AND processed_at IS NOT NULL AND processed_at < :cutoff""")
