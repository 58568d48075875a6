"""Messages under a message id another message has taken, told from repeats of that message.

Of the records a batch's insert passed over (shared.inbox.storing: a repeat in the batch, or a
message id stored before), each that holds an envelope is compared with the message stored under
its id, in one read that follows the insert only then. A repeat is that message sent again (a
relay's resend, a rebalance, a record read again), and is dropped. Another message, of another type
or payload (a producer reusing ids, a replay tool's template), is parked under an id of its own,
kept as it came, for an operator to replay or discard: dropped, it would be lost unsaid.

A repeat is nearly always the same bytes: the outbox keeps a message's envelope as it was
serialised once, and a relay resends that; a record read again is that record. So each row keeps a
digest of its record's value (`value_digest`), and a record whose value has the digest of the row
stored under its id is a repeat, whichever release reads it. Other bytes under the id are that
message only if something serialised it again (a producer other than its relay: a tool sending it
again, say), and are compared with it as the current contract (shared.contracts) reads both
(_is_sent_again): of its type, and its payload's declared fields the same, each as the contract
reads it (an amount of 10.5 and one of "10.50"); a value the contract refuses, and a payload of a
type this release does not know, as sent. So another message under a taken id is parked, whatever
this release makes of it, unless it is the same bytes. That tells a message serialised again from
another only where this release stored the row: a later release stores its contract's form
("10.50", UUIDs in lower case, the fields it does not declare dropped), which this one may not read
the record's in (a type it does not know, a value it refuses), and then the message serialised
again is parked as another. Strict all the same: a message parked is seen and can be replayed or
discarded, one dropped is lost unsaid. The reason of such a parked row (one of the stored one's
type) says that it may be a repeat, to be compared with the row under its id before it is replayed
(replayed, a repeat would be handled twice).

A row stored without a digest (before the column was, or by the release before it in a rolling
upgrade) is judged as it was before the digest, and there the doubt goes to the repeat. A repeat
must never be parked: replayed, it would be handled twice (the gateway's notifications, say, are
keyed by message id). And one record may be stored by one release and read again by another, which
stores it otherwise: a payload one refused is kept as sent (an amount of 10.5, a UUID in capitals,
a time in Z), where the other stores the contract's form ("10.50", lower case, +00:00) and drops
the fields it does not declare. So against such a row a field the record has and the row lacks is
taken for one its release dropped, a value this release refuses on either side is not compared,
and a message of a type it does not know is a repeat: such a message under a taken id is lost
unsaid, rather than a repeat parked to be handled twice. (The doubt lasts as long as those rows.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from marshmallow import ValidationError

from shared.contracts import PAYLOAD_SCHEMAS, ContractSchema
from shared.jsonio import loads_strict

if TYPE_CHECKING:
    from shared.inbox.storing import ConsumedRecord

# Ids for messages under a message_id another message has taken: derived from the message, so that
# the message sent again, at another offset, maps to the same inbox row.
_NAMESPACE = uuid.UUID("0b7f3c52-8d2e-4f61-a9c4-5e1d7a2b9f03")


# A record of a batch, with its inbox row (shared.inbox.storing.inbox_row).
Received = tuple["ConsumedRecord", dict[str, Any]]


@dataclass(frozen=True)
class UnderATakenId:
    """A message under a message id another message has taken, as it is to be parked."""

    row: dict[str, Any]  # its inbox row: as it came, parked with why under an id of its own
    taken_id: uuid.UUID  # the message id it came under
    reason: str  # why, without that id: many such messages are said in one line


@dataclass(frozen=True)
class _Message:
    """A message as compared: its type and payload (a JSON object, its numbers Decimals), and the
    digest of the record's value it was stored from or came as (None for a row stored without
    one)."""

    type: str | None
    payload: Any
    value_digest: bytes | None


@dataclass(frozen=True)
class _Unread:
    """A payload's value its field refuses (_read), as sent."""

    value: Any


def parked_under_taken_ids(cursor, received: list[Received], first: dict[uuid.UUID, Received],
                           inserted: dict[uuid.UUID, bool]) -> list[UnderATakenId]:
    """Of a batch's records (`received`, each with its inbox row; `first`, the first of each id,
    those the insert was given) those its insert passed over (`inserted`: the ids it stored) that
    are not the message stored under their id again, each once, as they are to be parked. The
    stored messages are read only if the insert passed over a record that holds an envelope (a
    record never parsed is parked under an id made of its position and value: the same id is the
    same record). Where no message is stored under an id now (pruned since the insert passed over
    it), the records under it are compared with the batch's first."""
    passed_over = [(record, row) for record, row in received if row.get("type") is not None
                   and not _stored_by_the_insert(row, first, inserted)]
    if not passed_over:
        return []
    stored = _stored_messages(cursor, {row["message_id"] for _, row in passed_over})
    parked: dict[uuid.UUID, UnderATakenId] = {}
    for record, row in passed_over:
        owner = stored.get(row["message_id"]) or _as_sent(*first[row["message_id"]])
        if not _is_sent_again(owner, _as_sent(record, row)):
            under = _parked(row, owner.type)
            parked.setdefault(under.row["message_id"], under)  # (the same message sent twice)
    return list(parked.values())


def _stored_by_the_insert(row: dict[str, Any], first: dict[uuid.UUID, Received],
                          inserted: dict[uuid.UUID, bool]) -> bool:
    """Whether the batch's insert stored `row` itself: its id's first in the batch, an id no
    message stored before had taken."""
    return first[row["message_id"]][1] is row and row["message_id"] in inserted


def _stored_messages(cursor, message_ids: set[uuid.UUID]) -> dict[uuid.UUID, _Message]:
    """The messages stored under these ids, by id: a message kept as its text (of an envelope
    version not known as it was stored) with the payload its text holds."""
    cursor.execute(_STORED_MESSAGES, ([str(message_id) for message_id in message_ids],))
    return {uuid.UUID(message_id): _Message(event_type, _stored_payload(payload, raw_value),
                                            None if value_digest is None else bytes(value_digest))
            for message_id, event_type, payload, raw_value, value_digest in cursor.fetchall()}


def _stored_payload(payload: str | None, raw_value: str | None) -> Any:
    """None where it cannot be read (a row edited by hand: no envelope, a number past what
    loads_strict takes), so that a record of other bytes under its id is parked, not its
    partition blocked."""
    try:
        return loads_strict(payload) if payload is not None else loads_strict(raw_value)["payload"]
    except (KeyError, TypeError, ValueError):
        return None


def _as_sent(record: ConsumedRecord, row: dict[str, Any]) -> _Message:
    """A record's message as it was sent: its payload as its value holds it (parsed once already,
    as its row was made)."""
    return _Message(row["type"], loads_strict(record.value.decode("utf-8"))["payload"],
                    row["value_digest"])


def _is_sent_again(stored: _Message, sent: _Message) -> bool:
    """Whether `sent`, a record's message as sent, is `stored` sent again: the same bytes, or else
    of its type and with its payload's declared fields the same, each as the current contract
    reads it (a value it refuses, and a payload of a type it does not know, as sent); against a
    row stored without a digest, as far as can be told (_is_sent_again_as_far_as_can_be_told)."""
    if stored.value_digest == sent.value_digest:
        return True
    if stored.type != sent.type:
        return False
    schema = PAYLOAD_SCHEMAS.get(sent.type)
    if schema is None and stored.value_digest is None:
        # Of a type this release does not know, a later release may have stored it in its
        # contract's form, which this one cannot read the record's in: taken for a repeat, so
        # never handled twice.
        return True
    stored_fields, sent_fields = _read(stored.payload, schema), _read(sent.payload, schema)
    if not (isinstance(stored_fields, dict) and isinstance(sent_fields, dict)):
        return False
    if stored.value_digest is None:
        return _is_sent_again_as_far_as_can_be_told(stored_fields, sent_fields)
    return stored_fields == sent_fields


def _is_sent_again_as_far_as_can_be_told(stored_fields: dict[str, Any],
                                         sent_fields: dict[str, Any]) -> bool:
    """Whether a record's payload, read (`sent_fields`), may be that of a row stored without a
    digest, read (`stored_fields`), stored by this release or another: every field of the stored
    one is in the record's, and equal. Storing a message drops fields (a tolerant reader's: those
    its release's contract does not declare) and writes others in the contract's form; it adds
    none, but a default the contract fills in, which the message as sent gets too. So a message
    missing a field the stored one has is another (a payload refused for a field missing, say),
    and one with a field more is not (a field a release before did not declare, and dropped). A
    value this release refuses on either side is not compared: a later release may read and store
    it in a form this one cannot read the other side's in (a time without a zone, say)."""
    return all(name in sent_fields
               and (isinstance(value, _Unread) or isinstance(sent_fields[name], _Unread)
                    or sent_fields[name] == value)
               for name, value in stored_fields.items())


def _read(payload: Any, schema: ContractSchema | None) -> Any:
    """A payload as the contract of its type reads it: loaded, its declared fields only; where it
    refuses the payload (a value this release does not know, a field missing), each declared field
    read as its field reads it where it can, else as it is (an amount of 10.5 and one of "10.50"
    the same, though the reason beside them is refused), or as an _Unread where its field refuses
    it. A payload of a type this release does not know (no `schema`) as it is."""
    if schema is None or not isinstance(payload, dict):
        return payload
    try:
        return schema.load(payload)
    except ValidationError:
        pass
    read = {}
    for name, field in schema.load_fields.items():
        key = field.data_key or name
        if key in payload:
            try:
                read[name] = field.deserialize(payload[key], key, payload)
            except ValidationError:
                read[name] = _Unread(payload[key])
    return read


def _parked(row: dict[str, Any], taken_by: str | None) -> UnderATakenId:
    """The row of a message under a message id another message, of type `taken_by`, has taken:
    the message as it came (its type, envelope version, correlation id, request id, and payload,
    or text if it is kept as its text), parked with why under an id of its own, so that an
    operator can replay it (handled under that id) or discard it."""
    if row["type"] != taken_by:
        why = (f"is that of a {taken_by!r} message already: a {row['type']!r} message under it"
               " is another message, not a repeat")
    else:
        why = (f"is that of a {taken_by!r} message already: one of another payload under it is"
               f" another message, not a repeat (or {_MAYBE_A_REPEAT})")
    if row.get("last_error"):  # (parked as it came too: a type or a version not known, say)
        why = f"{why}; and {row['last_error']}"
    return UnderATakenId(
        row=row | {"message_id": _id_of_its_own(row),
                   "parked": True,
                   "last_error": f"its message_id {row['message_id']} {why}"[:2000]},
        taken_id=row["message_id"], reason=f"its message_id {why}")


# What a message of the stored one's type under its id, parked, may be all the same: the other
# bytes compare unequal with a row a later release stored, in its contract's form.
_MAYBE_A_REPEAT = ("it may be a repeat serialised again, by a tool, if a later release stored the"
                   " one under that id: compare their payloads before replaying it")


def _id_of_its_own(row: dict[str, Any]) -> uuid.UUID:
    """The id a message under a taken message id is parked under: made of that id and the digest
    of the record's value, as sent, not of its position, so that the message sent again (a
    producer's retry, at another offset) is the same row, parked and said once, by whichever
    release reads it (each stores a payload in its own form)."""
    return uuid.uuid5(_NAMESPACE, f"{row['message_id']}:{row['value_digest'].hex()}")


# A plain read: it never waits. Payloads as text, so that their numbers are read exact (Decimals:
# loads_strict), as a record's are.
_STORED_MESSAGES = """
SELECT message_id::text, type, payload::text, raw_value, value_digest
FROM inbox_messages WHERE message_id = ANY(%s::uuid[])"""
