"""Records consumed from Kafka stored as inbox rows, once each, with a digest of their value: what
cannot be parsed parked under an id made of where it sat, a message this reader cannot take yet
parked under its own id, and a message under an id another message has taken (shared.inbox.
taken_ids tells it from a repeat) parked under an id of its own."""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg2.extras import Json, execute_values

from shared.contracts import (Envelope, MalformedMessage, PayloadRefused, decode,
                              knows_envelope_version)
from shared.inbox.taken_ids import Received, parked_under_taken_ids
from shared.jsonio import dumps_exact
from shared.request_context import (REQUEST_ID_KAFKA_HEADER, given_request_id_if_sane,
                                    named_at_most, request_ids_bound)

log = logging.getLogger(__name__)

# Ids for records that cannot be parsed: derived from where they sit in Kafka, so a redelivery of
# the same record maps to the same inbox row.
_POSITION_NAMESPACE = uuid.UUID("6f1d1b38-5a53-4a5e-9a57-2a1f5c3e7b11")


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


def _value_digest(record: ConsumedRecord) -> bytes:
    """SHA-256 of the record's value as it came (of no bytes, for a record without one)."""
    return hashlib.sha256(record.value or b"").digest()


def _position_id(record: ConsumedRecord, value_digest: bytes) -> uuid.UUID:
    """The id a record that cannot be parsed is parked under: its position, and a digest of its
    value, so that the record read again is the same row, and another record at the same position
    (a topic deleted and made again starts its offsets at 0) is a row of its own. Not its
    `message_id` header: nothing of such a record can be trusted, and parked under a valid
    message's id it would make the inbox drop that message as a repeat."""
    return uuid.uuid5(_POSITION_NAMESPACE,
                      f"{record.topic}:{record.partition}:{record.offset}:{value_digest.hex()}")


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


def _request_id_given(record: ConsumedRecord) -> str | None:
    """The record's request_id header if it is a sane id (shared.request_context), else none, as
    for a record without one. Checked once, here, as an HTTP request's X-Request-ID and a gRPC
    call's are where they come in: the inbox's id is the one its message's lines are logged with
    and the one the messages its handler writes carry on, so an id of anyone's making (a comma in
    it, written as two messages' ids are; a bracket and a line break, a log line forged) goes no
    further. (None, not a new id as HTTP gives: a message starts no action, and one without an id
    is stored with none.) Not cut to the column's length first: a longer id is no sane one."""
    return given_request_id_if_sane(_storable_text(record.headers.get(REQUEST_ID_KAFKA_HEADER)))


def _request_id_or(row: dict[str, Any], causation_id: str | None) -> str | None:
    """The row's request id (its record's header), or, for a record without a sane one, the
    `causation_id` of its envelope if that is a sane id (the shop writes the two alike; another
    producer may write only the envelope's)."""
    return row["request_id"] or given_request_id_if_sane(causation_id)


def inbox_row(record: ConsumedRecord) -> dict[str, Any]:
    """The inbox row for a record: a parsed event; a parked one, its type or its payload refused,
    or its envelope version, kept as its text; or a parked row holding the raw value."""
    row = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _storable_text(record.key, 255),
        "request_id": _request_id_given(record),
        "produced_at": record.timestamp,
        "value_digest": _value_digest(record),
    }
    try:
        envelope: Envelope = decode(record.value)
    except PayloadRefused as exc:
        if not knows_envelope_version(exc.envelope["version"]):
            return _kept_as_text(row, record, exc)
        try:
            payload = _JsonText(_jsonb_text(exc.envelope["payload"],
                                            numbers_printed_at_most=4 * len(record.value)))
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than it is written)
            return _parked_raw(row, record, exc)
        # Parked under its own id with its payload as sent: once this service knows its type or
        # its payload's new form, a replay hands it to its handler, which reads the payload again
        # (handling._ready_to_handle). Its offset is committed all the same, so kept only as a
        # raw value under its position, it could never be handled: an order paid for by a newer
        # payments service, say, would stay NEW for ever.
        return row | {
            "message_id": exc.envelope["message_id"],
            "type": exc.envelope["type"],
            "envelope_version": exc.envelope["version"],
            "correlation_id": exc.envelope["correlation_id"],
            "request_id": _request_id_or(row, exc.envelope.get("causation_id")),
            "payload": payload,
            "parked": True,
            "last_error": _storable_text(str(exc), 2000),
        }
    except MalformedMessage as exc:
        return _parked_raw(row, record, exc)
    return row | {
        "message_id": envelope.message_id,
        "type": envelope.type,
        "envelope_version": envelope.version,
        "correlation_id": envelope.correlation_id,
        "request_id": _request_id_or(row, envelope.causation_id),
        "payload": envelope.payload_json(),
    }


def _kept_as_text(row: dict[str, Any], record: ConsumedRecord,
                  exc: PayloadRefused) -> dict[str, Any]:
    """A message of an envelope version this reader does not know, parked under its own id with
    its type and version, and its text as it came (UTF-8 JSON, which PostgreSQL's text holds as it
    is). Only what every version carries was read of it: once the service knows the version, a
    replay reads the text again as a fresh read would, whole (handling._ready_to_handle). No
    payload: a release that reads no version (the one before envelope_version) replays only rows
    with one, and would hand it to its handler as version 1."""
    return row | {
        "message_id": exc.envelope["message_id"],
        "type": exc.envelope["type"],
        "envelope_version": exc.envelope["version"],
        "correlation_id": exc.envelope["correlation_id"],
        "raw_value": record.value.decode("utf-8"),
        "parked": True,
        "last_error": _storable_text(str(exc), 2000),
    }


def _parked_raw(row: dict[str, Any], record: ConsumedRecord,
                exc: MalformedMessage) -> dict[str, Any]:
    """A record that cannot be handled as it is, parked as the text it came as."""
    return row | {
        "message_id": _position_id(record, row["value_digest"]),
        "raw_value": _storable_text(record.value),
        "parked": True,
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
    """Insert the records not seen before on a driver cursor in autocommit (the consumer's:
    shared/inbox_consumer.py); return the ids of the new ones that await handling. The new ones
    parked are said, as a handler's parking is, a line for each reason (_say_parked).

    A batch is stored with one statement, atomic on its own, unless that insert passed over a
    record: then a read of the messages stored under those ids follows, and an insert of the
    messages under taken ids, if any (shared.inbox.taken_ids: a record under an id a message is
    stored under already, before or earlier in the batch, that is not that message again, but
    another, is parked under an id of its own rather than dropped as a repeat). The three are no
    one transaction: should the read or the second insert fail, the batch fails and is read again
    from Kafka, and the new messages the first insert stored, not new then, are not returned
    again: the sweeper hands them over (after INBOX_SWEEP_MIN_AGE_SECONDS), and those it parked
    have been said already. (A transaction around every batch would cost its BEGIN and COMMIT on
    every batch, for the sake of batches that hold a repeat; whether one does is known only once
    the first insert has committed.)"""
    if not records:
        return []
    received = [(record, inbox_row(record)) for record in records]
    first: dict[uuid.UUID, Received] = {}
    for record, row in received:
        first.setdefault(row["message_id"], (record, row))  # a repeat inside a batch: stored once
    inserted = _insert(cursor, [row for _, row in first.values()])
    # (Read again, a record stored before is not inserted, and not said again.)
    _say_parked([(row["last_error"], row, None) for message_id, (_, row) in first.items()
                 if inserted.get(message_id)])
    under_taken_ids = parked_under_taken_ids(cursor, received, first, inserted)
    if under_taken_ids:
        parked_now = _insert(cursor, [parked.row for parked in under_taken_ids])
        _say_parked([(parked.reason, parked.row, parked.taken_id) for parked in under_taken_ids
                     if parked.row["message_id"] in parked_now])
    return [message_id for message_id, parked in inserted.items() if not parked]


def _say_parked(parked: list[tuple[str, dict[str, Any], uuid.UUID | None]]) -> None:
    """Say the rows parked as they arrived, each given with its reason and the taken message id it
    came under (if it did), in an ERROR line for each reason, with their request ids: naming
    IDS_NAMED_AT_MOST of them, where they sat, and counting the others, so that a producer
    flooding a topic with what cannot be handled gives a few lines a batch, not one a record."""
    by_reason: dict[str, list[tuple[dict[str, Any], uuid.UUID | None]]] = {}
    for reason, row, taken_id in parked:
        by_reason.setdefault(reason, []).append((row, taken_id))
    for reason, rows in by_reason.items():
        with request_ids_bound(row["request_id"] for row, _ in rows):
            log.error("parked inbox message(s) as they arrived (%d): %s: %s", len(rows),
                      named_at_most([_said_where(row, taken_id) for row, taken_id in rows], ", "),
                      reason)


def _said_where(row: dict[str, Any], taken_id: uuid.UUID | None) -> str:
    """A parked row's id as its line names it: where it sat, and the message id it came under
    if that was taken."""
    taken = f", under message_id {taken_id}" if taken_id is not None else ""
    return (f"{row['message_id']} ({row['topic']} [{row['partition']}] @ {row['offset']}"
            f"{taken})")


def _insert(cursor, rows: list[dict[str, Any]]) -> dict[uuid.UUID, bool]:
    """Insert the rows not stored yet; returns whether each inserted is parked, by its id."""
    values = [(str(row["message_id"]), row["topic"], row["partition"], row["offset"], row["key"],
               row.get("type"), row.get("envelope_version"), row.get("correlation_id"),
               row["request_id"], _as_json(row.get("payload")), row.get("raw_value"),
               bool(row.get("parked")), row.get("last_error"), row["produced_at"],
               row["value_digest"])
              for row in rows]
    inserted = execute_values(cursor, _STORE, values, template=_STORED_ROW, page_size=len(values),
                              fetch=True)
    return {uuid.UUID(message_id): parked for message_id, parked in inserted}


def _as_json(payload: dict[str, Any] | Json | None) -> Json | None:
    return payload if payload is None or isinstance(payload, Json) else Json(payload)


# The inbox's statements go straight to the driver, as every message passes through them: the
# consumer stores on a psycopg2 connection of its own (the handlers' are on a driver_cursor:
# handling).
# A record already stored is passed over by a read of the stored ids, which never waits, before the
# insert: an insert meeting a row that a handler's transaction has marked and not yet committed
# waits for it (up to lock_timeout, 2 s, then the whole batch failed and was read again, until the
# handler committed). ON CONFLICT is for two consumers storing one new record at once.
_STORE = """
INSERT INTO inbox_messages (message_id, topic, partition, "offset", key, type, envelope_version,
                            correlation_id, request_id, payload, raw_value, parked_at, last_error,
                            produced_at, value_digest)
SELECT * FROM (VALUES %s) AS received (message_id, topic, partition, "offset", key, type,
                                        envelope_version, correlation_id, request_id, payload,
                                        raw_value, parked_at, last_error, produced_at,
                                        value_digest)
WHERE NOT EXISTS (SELECT FROM inbox_messages AS stored
                  WHERE stored.message_id = received.message_id)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id::text, parked_at IS NOT NULL"""
# (Typed: the values of a VALUES list read as text where they are not numbers.) A row parked as
# it is stored is parked at the database's clock, as every inbox time the sweeper and `replay` /
# `discard --all` compare (shared.db.database_now): its `parked` (True) asks for it.
_STORED_ROW = ("(%s::uuid, %s, %s, %s, %s, %s, %s::smallint, %s, %s, %s::jsonb, %s,"
               " CASE WHEN %s THEN clock_timestamp() END, %s, %s::timestamptz, %s::bytea)")
