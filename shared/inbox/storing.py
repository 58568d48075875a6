"""Records consumed from Kafka stored as inbox rows, once each (unparseable ones parked)."""

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
from shared.inbox.model import utc_now
from shared.jsonio import dumps_exact
from shared.request_context import (REQUEST_ID_KAFKA_HEADER, given_request_id_if_sane,
                                    named_at_most, request_ids_bound)

log = logging.getLogger(__name__)

# Ids for records that cannot be parsed: derived from where they sit in Kafka, so a redelivery of
# the same record maps to the same inbox row.
_POSITION_NAMESPACE = uuid.UUID("6f1d1b38-5a53-4a5e-9a57-2a1f5c3e7b11")
# Ids for messages under a message_id another message has taken: derived from the message, so that
# the message sent again, at another offset, maps to the same inbox row.
_TAKEN_ID_NAMESPACE = uuid.UUID("0b7f3c52-8d2e-4f61-a9c4-5e1d7a2b9f03")


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


def _request_id_given(record: ConsumedRecord) -> str | None:
    """The record's request_id header if it is a sane id (shared.request_context), else none, as
    for a record without one. Checked once, here, as an HTTP request's X-Request-ID and a gRPC
    call's are where they come in: the inbox's id is the one its message's lines are logged with
    and the one the messages its handler writes carry on, so an id of anyone's making (a comma in
    it, written as two messages' ids are; a bracket and a line break, a log line forged) goes no
    further. (None, not a new id as HTTP gives: a message starts no action, and one without an id
    is stored with none.) Not cut to the column's length first: a longer id is no sane one."""
    return given_request_id_if_sane(_storable_text(record.headers.get(REQUEST_ID_KAFKA_HEADER)))


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
            "payload": payload,
            "parked_at": utc_now(),
            "last_error": _storable_text(str(exc), 2000),
        }
    except MalformedMessage as exc:
        return _parked_raw(row, record, exc)
    return row | {
        "message_id": envelope.message_id,
        "type": envelope.type,
        "envelope_version": envelope.version,
        "correlation_id": envelope.correlation_id,
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
        "parked_at": utc_now(),
        "last_error": _storable_text(str(exc), 2000),
    }


def _parked_raw(row: dict[str, Any], record: ConsumedRecord,
                exc: MalformedMessage) -> dict[str, Any]:
    """A record that cannot be handled as it is, parked as the text it came as."""
    return row | {
        "message_id": _position_id(record),
        "raw_value": _storable_text(record.value),
        "parked_at": utc_now(),
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
    messages under taken ids (below), if any. The three are no one transaction: should the read or
    the second insert fail, the batch fails and is read again from Kafka, and the new messages the
    first insert stored, not new then, are not returned again: the sweeper hands them over (after
    INBOX_SWEEP_MIN_AGE_SECONDS), and those it parked have been said already. (A transaction
    around every batch would cost its BEGIN and COMMIT on every batch, for the sake of batches that
    hold a repeat; whether one does is known only once the first insert has committed.)

    A record under a message id a message is stored under already, before or earlier in the batch,
    is a repeat only if it is that message again, of its type and payload (a resend, a rebalance, a
    record read again): one of another type, or of the same type with another payload, is another
    message under a taken id (a producer reusing ids), which dropped would be lost unsaid; it is
    parked under an id of its own, made of it, instead (_parked_under_a_taken_id). The stored
    messages are read (_STORED_OWNERS) only for a batch whose insert passed over a record, and the
    parked rows inserted with a statement more only when there are any."""
    if not records:
        return []
    received = [inbox_row(record) for record in records]
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for row in received:
        rows.setdefault(row["message_id"], row)  # a repeat inside one batch is stored once
    inserted = _insert(cursor, list(rows.values()))
    # (Read again, a record stored before is not inserted, and not said again.)
    _say_parked([row for message_id, row in rows.items() if inserted.get(message_id)])
    under_taken_ids: dict[uuid.UUID, dict[str, Any]] = {}
    for row, owner_type in _under_taken_ids(
            cursor, [row for row in received if _passed_over(row, rows, inserted)], rows):
        parked = _parked_under_a_taken_id(row, owner_type)
        under_taken_ids.setdefault(parked["message_id"], parked)  # (the same message sent twice)
    if under_taken_ids:
        parked_now = _insert(cursor, list(under_taken_ids.values()))
        _say_parked([row for message_id, row in under_taken_ids.items()
                     if message_id in parked_now])
    return [message_id for message_id, parked in inserted.items() if not parked]


def _say_parked(rows: list[dict[str, Any]]) -> None:
    """Say the rows parked as they arrived in an ERROR line for each reason, with their request
    ids: naming IDS_NAMED_AT_MOST of them, where they sat, and counting the others, so that a
    producer flooding a topic with what cannot be handled gives a few lines a batch, not one a
    record."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_reason.setdefault(row.get("reason_said") or row["last_error"], []).append(row)
    for reason, parked in by_reason.items():
        with request_ids_bound(row["request_id"] for row in parked):
            log.error("parked inbox message(s) as they arrived (%d): %s: %s", len(parked),
                      named_at_most([_said_where(row) for row in parked], ", "), reason)


def _said_where(row: dict[str, Any]) -> str:
    """A parked row's id as its line names it: where it sat, and the message id it came under
    if that was taken."""
    taken = f", under message_id {row['taken_id']}" if "taken_id" in row else ""
    return (f"{row['message_id']} ({row['topic']} [{row['partition']}] @ {row['offset']}"
            f"{taken})")


def _passed_over(row: dict[str, Any], rows: dict[uuid.UUID, dict[str, Any]],
                 inserted: dict[uuid.UUID, bool]) -> bool:
    """Whether the record of `row` was not stored by the batch's insert (a repeat in the batch, or
    its id stored before) and holds an envelope: a record never parsed is parked under an id made
    of its position and value, so the same id is the same record."""
    if row.get("type") is None:
        return False
    return rows[row["message_id"]] is not row or row["message_id"] not in inserted


def _under_taken_ids(cursor, passed_over: list[dict[str, Any]],
                     first_rows: dict[uuid.UUID, dict[str, Any]]
                     ) -> list[tuple[dict[str, Any], str | None]]:
    """Those of the rows passed over that are not the message stored under their id again, with
    the type of that message; or, where none is stored now (pruned since the insert passed over
    it), those that are not the first record of the batch under their id again (`first_rows`)."""
    if not passed_over:
        return []
    values = []
    for at, row in enumerate(passed_over):
        first = first_rows[row["message_id"]]
        values.append((at, str(row["message_id"]), row["type"], _as_json(row.get("payload")),
                       row.get("raw_value"), first["type"], _as_json(first.get("payload")),
                       first.get("raw_value")))
    found = execute_values(cursor, _STORED_OWNERS, values, template=_RECEIVED_ENVELOPE,
                           page_size=len(values), fetch=True)
    return [(passed_over[at], owner_type) for at, owner_type, another in found if another]


def _insert(cursor, rows: list[dict[str, Any]]) -> dict[uuid.UUID, bool]:
    """Insert the rows not stored yet; returns whether each inserted is parked, by its id."""
    values = [(str(row["message_id"]), row["topic"], row["partition"], row["offset"], row["key"],
               row.get("type"), row.get("envelope_version"), row.get("correlation_id"),
               row["request_id"], _as_json(row.get("payload")), row.get("raw_value"),
               row.get("parked_at"), row.get("last_error"), row["produced_at"])
              for row in rows]
    inserted = execute_values(cursor, _STORE, values, template=_STORED_ROW, page_size=len(values),
                              fetch=True)
    return {uuid.UUID(message_id): parked for message_id, parked in inserted}


def _parked_under_a_taken_id(row: dict[str, Any], taken_by: str | None) -> dict[str, Any]:
    """The row of a message under a message id another message, of type `taken_by`, has taken:
    the message as it came (its type, envelope version, correlation id, request id, and payload,
    or text if it is kept as its text), parked with why under an id of its own, so that an
    operator can replay it (handled under that id) or discard it."""
    this = (f"a {row['type']!r} message under it" if row["type"] != taken_by
            else "one of another payload under it")
    why = f"is that of a {taken_by!r} message already: {this} is another message, not a repeat"
    if row.get("last_error"):  # (parked as it came too: a type or a version not known, say)
        why = f"{why}; and {row['last_error']}"
    # (Said, with others alike, naming the id taken beside the message's own: _say_parked.)
    return row | {"message_id": _id_of_its_own(row), "parked_at": utc_now(),
                  "last_error": _storable_text(f"its message_id {row['message_id']} {why}", 2000),
                  "taken_id": row["message_id"], "reason_said": f"its message_id {why}"}


def _id_of_its_own(row: dict[str, Any]) -> uuid.UUID:
    """The id a message under a taken message id is parked under: made of that id, its type and
    a digest of its payload (or text), not of its position, so that the message sent again (a
    producer's retry, at another offset) is the same row, parked and said once."""
    payload = row.get("payload")
    if payload is None:
        content = row.get("raw_value") or ""
    else:
        content = payload.adapted if isinstance(payload, _JsonText) else dumps_exact(payload)
    digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
    return uuid.uuid5(_TAKEN_ID_NAMESPACE, f"{row['message_id']}:{row['type']}:{digest}")


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
                            produced_at)
SELECT * FROM (VALUES %s) AS received (message_id, topic, partition, "offset", key, type,
                                        envelope_version, correlation_id, request_id, payload,
                                        raw_value, parked_at, last_error, produced_at)
WHERE NOT EXISTS (SELECT FROM inbox_messages AS stored
                  WHERE stored.message_id = received.message_id)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id::text, parked_at IS NOT NULL"""
# For each record of a batch its insert passed over, the type of the message stored under its id,
# and whether the record is another message (insert_records): of another type, or of another
# payload. Payloads are compared by containment either way, not equality: a consumer stores the
# payload of a message it reads as its contract has it, and in a rolling upgrade the same record
# read by the release before and the one after can be stored with a field more or less (a field
# added, which a tolerant reader drops; a payload refused, kept as sent). A message kept as its
# text (no payload) is compared by its text; one kept as its text and one read whole cannot be
# compared, and are taken for the same (the same record, read across an upgrade that made its
# envelope version known). Where no message is stored under the id now (pruned since the insert
# passed over it), the record is compared with the batch's first under it (first_*): another
# message beside it in the batch is still no repeat. Asked only when the insert passed over a
# record. A plain read: it never waits.
_STORED_OWNERS = """
SELECT received.at, owner.type,
       owner.type IS DISTINCT FROM received.type
       OR CASE WHEN owner.payload IS NOT NULL AND received.payload IS NOT NULL
               THEN NOT (owner.payload @> received.payload OR owner.payload <@ received.payload)
               WHEN owner.raw_value IS NOT NULL AND received.raw_value IS NOT NULL
               THEN owner.raw_value <> received.raw_value
               ELSE false END
FROM (VALUES %s) AS received (at, message_id, type, payload, raw_value, first_type, first_payload,
                              first_raw_value)
CROSS JOIN LATERAL (SELECT stored.type, stored.payload, stored.raw_value, 0 AS choice
                    FROM inbox_messages AS stored WHERE stored.message_id = received.message_id
                    UNION ALL
                    SELECT received.first_type, received.first_payload, received.first_raw_value, 1
                    ORDER BY choice LIMIT 1) AS owner
ORDER BY received.at"""
_RECEIVED_ENVELOPE = "(%s, %s::uuid, %s, %s::jsonb, %s, %s, %s::jsonb, %s)"
# (Typed: the values of a VALUES list read as text where they are not numbers.)
_STORED_ROW = ("(%s::uuid, %s, %s, %s, %s, %s, %s::smallint, %s, %s, %s::jsonb, %s,"
               " %s::timestamptz, %s, %s::timestamptz)")
