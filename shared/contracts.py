"""The event contract between the services: the envelope every Kafka message carries, and the
payload of each event type.

Value: UTF-8 JSON `{"message_id", "type", "version", "occurred_at", "correlation_id",
"causation_id", "payload"}`: `correlation_id` the order the message is about, `causation_id` the
X-Request-ID of the API request that led to it (for a message a handler writes, the one the message
it handles carried, so an order's every message carries its click's id), null when no request led
to it. Key: the user id, so that one user's messages stay in order. Headers: `message_id` and
`type`, and `request_id` when an API request led to the message: the same id as `causation_id`
(read by consumers that look at the headers only). `causation_id` came after the first release: a
reader takes a value without it (an outbox row written before, relayed as written) as null.

A tolerant reader, a strict writer. During a rolling upgrade one service's new version runs before
the other's, and a field added to an envelope or a payload is backward compatible: a reader takes
a message with fields it does not know and drops them (they are not in the loaded payload, so the
inbox stores, and a handler, a notification page included, sees only the fields the reader's
contract declares), while every field it knows is checked as strictly as ever (required, types,
amounts, the envelope's version). What a reader cannot take (a type it does not know, a known
field it refuses, an envelope version it does not know) is still refused, and kept with its id
and type, and its payload (of a version it does not know, its whole text), to be read again once
the reader knows better (PayloadRefused). The shop itself writes only what its contract declares:
new_event refuses a payload with a field more. So a field may be added only where a reader that
drops it still does what the message asks: one that changes what a known field means (a currency
beside `amount`, say) needs a new type or envelope version, which readers that do not know it
refuse and keep. An envelope of any version carries `message_id`, `type`, `version` and `payload`
(and `correlation_id`, if it has one) as version 1 does: they are what a reader that does not know
the version needs to keep the message.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from shared.fields import Amount, Text, UserId
from shared.jsonio import loads_strict

log = logging.getLogger(__name__)

PAYMENT_REQUESTED = "PaymentRequested"
PAYMENT_SUCCEEDED = "PaymentSucceeded"
PAYMENT_FAILED = "PaymentFailed"
ORDER_STATUS_CHANGED = "OrderStatusChanged"

ENVELOPE_VERSION = 1
# The envelope versions this reader knows: a message of another is refused (PayloadRefused), kept
# as its text to be read again once the reader knows it (knows_envelope_version).
KNOWN_ENVELOPE_VERSIONS = frozenset({ENVELOPE_VERSION})
# The highest version an envelope may name: the most the inbox's column (smallint) holds.
HIGHEST_ENVELOPE_VERSION = 32767

# Why a payment was refused; orders copy it onto the cancelled order.
NO_ACCOUNT = "NO_ACCOUNT"
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
FAILURE_REASONS = (NO_ACCOUNT, INSUFFICIENT_FUNDS)


class MalformedMessage(ValueError):
    """A message that does not follow the contract: it can never be processed, only parked."""


class PayloadRefused(MalformedMessage):
    """A well-formed envelope of a version this reader does not know, or of a type it does not
    know, or whose payload breaks its type's contract, as this reader has it: most likely sent by
    a producer newer than the reader (a rolling upgrade, one service's new version running before
    the other's). `envelope` holds the envelope's fields (its version among them), the payload as
    sent: kept with the message's own id (of a version the reader does not know, as its text), the
    message can be handed back once the reader knows better (python -m tasks.parked replay)."""

    def __init__(self, reason: str, envelope: dict[str, Any]):
        super().__init__(reason)
        self.envelope = envelope


class ContractSchema(Schema):
    """A schema of the contract, as a reader loads it: fields it does not know are dropped, not
    refused (a newer producer's additive fields: the module's docstring)."""

    class Meta:
        unknown = EXCLUDE


class PaymentRequestedSchema(ContractSchema):
    order_id = fields.UUID(required=True)
    user_id = UserId(required=True)
    amount = Amount(required=True)


class PaymentSucceededSchema(PaymentRequestedSchema):
    pass


class PaymentFailedSchema(PaymentRequestedSchema):
    reason = fields.String(required=True, validate=validate.OneOf(FAILURE_REASONS))


class OrderStatusChangedSchema(ContractSchema):
    """An order reached a new status; the gateway tells its owner's open pages."""

    order_id = fields.UUID(required=True)
    user_id = UserId(required=True)
    amount = Amount(required=True)
    status = fields.String(required=True, validate=validate.OneOf(("NEW", "FINISHED", "CANCELLED")))
    reason = fields.String(required=True, allow_none=True,
                           validate=validate.OneOf((*FAILURE_REASONS, None)))
    updated_at = fields.AwareDateTime(required=True, format="iso")


PAYLOAD_SCHEMAS: dict[str, ContractSchema] = {
    PAYMENT_REQUESTED: PaymentRequestedSchema(),
    PAYMENT_SUCCEEDED: PaymentSucceededSchema(),
    PAYMENT_FAILED: PaymentFailedSchema(),
    ORDER_STATUS_CHANGED: OrderStatusChangedSchema(),
}


class ToldOnText(fields.Field):
    """A field a reader only tells on and never acts upon: a string is kept as it is, anything else
    is read as none, never refused (the message it is in is not parked for it)."""

    def _deserialize(self, value, attr, data, **kwargs):
        return value if isinstance(value, str) else None


class EnvelopeOfAnyVersionSchema(ContractSchema):
    """An envelope as a reader reads one of a version it does not know: what every version
    carries, enough to keep the message (its text) under its own id with its type and version, to
    be read again, whole, once the reader knows the version. The rest may have changed with the
    version, and is not read."""

    message_id = fields.UUID(required=True)
    # Any type: one this reader does not know is refused with its payload (PayloadRefused). At
    # most what the inbox's column holds.
    type = Text(required=True, validate=validate.Length(min=1, max=100))
    # Any version: one this reader does not know is refused (PayloadRefused), and kept.
    version = fields.Integer(required=True, strict=True,
                             validate=validate.Range(min=1, max=HIGHEST_ENVELOPE_VERSION))
    # At most what the inbox's column holds: a longer one would fail the batch's insert.
    correlation_id = Text(load_default=None, allow_none=True, validate=validate.Length(max=100))
    payload = fields.Dict(required=True)


class EnvelopeSchema(EnvelopeOfAnyVersionSchema):
    """An envelope of a version this reader knows, every field of it required."""

    occurred_at = fields.AwareDateTime(required=True, format="iso")
    correlation_id = Text(required=True, allow_none=True, validate=validate.Length(max=100))
    # Added after the first release, so optional: a value written before it has none. Only told
    # on (the inbox takes it for the message's request id, shared.inbox.storing, only when it is a
    # sane one), so never a reason to refuse a message: any string is kept, anything else (a
    # number from another producer, say) read as none.
    causation_id = ToldOnText(load_default=None, allow_none=True)


_ENVELOPE_SCHEMA = EnvelopeSchema()
_ENVELOPE_OF_ANY_VERSION_SCHEMA = EnvelopeOfAnyVersionSchema()


@dataclass(frozen=True)
class Envelope:
    type: str
    payload: dict[str, Any]
    correlation_id: str | None = None
    # The X-Request-ID of the request that led to the event: set as the outbox writes it
    # (shared.outbox.writing), which knows the request.
    causation_id: str | None = None
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    version: int = ENVELOPE_VERSION
    # The payload in its wire form, when new_event made it to check it: serialising a payload costs
    # more than anything else about an event, so an event the shop makes is serialised once.
    wire_payload: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def payload_json(self) -> dict[str, Any]:
        """The payload's wire form: fields serialised by their contract (amounts as strings)."""
        if self.wire_payload is not None:
            return self.wire_payload
        return PAYLOAD_SCHEMAS[self.type].dump(self.payload)

    def to_json(self) -> dict[str, Any]:
        """The wire form of the whole envelope."""
        return {
            "message_id": str(self.message_id),
            "type": self.type,
            "version": self.version,
            "occurred_at": self.occurred_at.isoformat(timespec="microseconds"),
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "payload": self.payload_json(),
        }

    def caused_by(self, request_id: str | None) -> Envelope:
        """The event as the request `request_id` led to it (or none: None)."""
        return self if request_id == self.causation_id else replace(self, causation_id=request_id)

    def to_wire(self) -> str:
        """The message value as it goes to Kafka: the envelope as compact JSON text."""
        return wire_text(self.to_json())


def new_event(event_type: str, payload: dict[str, Any]) -> Envelope:
    """A new event, its payload checked against the contract before it is ever written: a field
    the contract does not declare is refused too (the dump would drop it unsaid, and the readers,
    tolerant, would never say either). Its correlation id is the order it is about, its payload's
    `order_id` (every type has one), as the contract has it: never taken from the message that led
    to it, which another producer may have sent with none, or another."""
    undeclared = payload.keys() - PAYLOAD_SCHEMAS[event_type].dump_fields.keys()
    if undeclared:
        raise MalformedMessage(f"{event_type} payload has fields its contract does not declare: "
                               f"{sorted(undeclared)}")
    wire_payload = PAYLOAD_SCHEMAS[event_type].dump(payload)
    errors = PAYLOAD_SCHEMAS[event_type].validate(wire_payload)
    if errors:
        raise MalformedMessage(f"{event_type} payload breaks the contract: {errors}")
    return Envelope(type=event_type, payload=payload, correlation_id=wire_payload["order_id"],
                    wire_payload=wire_payload)


# The fields a reader dropped, said once per process for each type and set of them (at most this
# many sets: a producer writing a new field name into every message is said so far, not for ever).
DROPPED_FIELDS_SAID_AT_MOST = 256
_dropped_fields_said: set[tuple[str, frozenset[str], frozenset[str]]] = set()
_dropped_fields_lock = threading.Lock()


def _say_fields_dropped(event_type: str, in_envelope: set[str], in_payload: set[str]) -> None:
    """Say that the reader dropped fields it does not know, once for each kind: during a rolling
    upgrade the operator sees which fields a newer producer writes that this reader drops (and can
    tell one it must not drop: the module's docstring), not a line for every message."""
    if not (in_envelope or in_payload):
        return
    seen = (event_type, frozenset(in_envelope), frozenset(in_payload))
    with _dropped_fields_lock:
        if seen in _dropped_fields_said or len(_dropped_fields_said) >= DROPPED_FIELDS_SAID_AT_MOST:
            return
        _dropped_fields_said.add(seen)
    log.info("%s messages carry fields this reader does not know, read without them: in the"
             " envelope %s, in the payload %s", event_type, sorted(in_envelope) or "none",
             sorted(in_payload) or "none")


@functools.cache
def declared_fields(event_type: str) -> frozenset[str]:
    """The payload fields the contract of a type this reader knows declares, as written (asked
    for each message read and each handled: the contracts do not change in a process)."""
    return frozenset(field.data_key or name
                     for name, field in PAYLOAD_SCHEMAS[event_type].load_fields.items())


def wire_text(envelope_json: dict[str, Any]) -> str:
    """An envelope-shaped dict as the text of a message value: compact JSON."""
    return json.dumps(envelope_json, separators=(",", ":"))


def encode(envelope_json: dict[str, Any]) -> bytes:
    """Any envelope-shaped dict as a message value (Envelope.to_wire() is the text of one)."""
    return wire_text(envelope_json).encode("utf-8")


def knows_envelope_version(version: int | None) -> bool:
    """Whether this reader knows the envelope version (asked as a message is read, and again as
    a stored one is handled: a message kept for a version the reader did not know is handled only
    once it does)."""
    return version in KNOWN_ENVELOPE_VERSIONS


def _of_a_known_version(raw: dict[str, Any]) -> bool:
    version = raw.get("version")
    return type(version) is int and knows_envelope_version(version)


def decode(value: bytes | None) -> Envelope:
    """Parse and validate a message value; raise MalformedMessage if it breaks the contract
    (PayloadRefused if it is a well-formed envelope this reader cannot take, of a version or a
    type it does not know or with a payload it refuses)."""
    if value is None:
        raise MalformedMessage("message has no value")
    try:
        raw = loads_strict(value.decode("utf-8"))  # too deep or too large: a ValueError too
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"value is not UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedMessage("value is not a JSON object")
    schema = _ENVELOPE_SCHEMA if _of_a_known_version(raw) else _ENVELOPE_OF_ANY_VERSION_SCHEMA
    try:
        envelope = schema.load(raw)
    except ValidationError as exc:
        raise MalformedMessage(f"message breaks the contract: {exc.messages}") from None
    if not knows_envelope_version(envelope["version"]):
        raise PayloadRefused(f"envelope version {envelope['version']} is not one this reader"
                             f" knows ({', '.join(map(str, sorted(KNOWN_ENVELOPE_VERSIONS)))})",
                             envelope)
    if envelope["type"] not in PAYLOAD_SCHEMAS:
        raise PayloadRefused(f"unknown message type {envelope['type']!r}", envelope)
    try:
        payload = PAYLOAD_SCHEMAS[envelope["type"]].load(envelope["payload"])
    except ValidationError as exc:
        raise PayloadRefused(f"{envelope['type']} payload breaks the contract: {exc.messages}",
                             envelope) from None
    _say_fields_dropped(envelope["type"], raw.keys() - _ENVELOPE_SCHEMA.load_fields.keys(),
                        envelope["payload"].keys() - declared_fields(envelope["type"]))
    return Envelope(
        type=envelope["type"],
        payload=payload,
        correlation_id=envelope["correlation_id"],
        causation_id=envelope["causation_id"],
        message_id=envelope["message_id"],
        occurred_at=envelope["occurred_at"],
        version=envelope["version"],
    )
