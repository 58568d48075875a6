import json
import uuid
from decimal import Decimal

import pytest

from shared.contracts import (PAYMENT_FAILED, PAYMENT_REQUESTED, MalformedMessage, PayloadRefused,
                              decode, encode, new_event)


def _request_event():
    return new_event(
        PAYMENT_REQUESTED,
        {"order_id": uuid.uuid4(), "user_id": "alice", "amount": Decimal("30.00")},
        correlation_id="order-1",
    )


def test_an_event_survives_the_wire_with_amounts_as_strings():
    event = _request_event()
    wire = encode(event.to_json())
    body = json.loads(wire)
    assert body["payload"]["amount"] == "30.00"
    assert body["version"] == 1
    assert set(body) == {"message_id", "type", "version", "occurred_at", "correlation_id",
                         "payload"}
    decoded = decode(wire)
    assert decoded.message_id == event.message_id
    assert decoded.payload == event.payload
    assert decoded.correlation_id == "order-1"


def test_a_new_event_keeps_the_wire_form_it_checked_and_a_decoded_one_builds_it():
    event = _request_event()
    decoded = decode(encode(event.to_json()))
    assert event.wire_payload is not None and decoded.wire_payload is None
    assert event.payload_json() == decoded.payload_json() == {
        "order_id": str(event.payload["order_id"]), "user_id": "alice", "amount": "30.00"}
    assert decoded == event  # the wire form is a cache, not part of the event


def test_a_new_event_must_follow_its_contract():
    with pytest.raises(MalformedMessage):
        new_event(PAYMENT_FAILED, {"order_id": uuid.uuid4(), "user_id": "bob",
                                   "amount": Decimal("1.00"), "reason": "BECAUSE"}, None)


def _wire(**changes):
    body = _request_event().to_json()
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("value", [
    None,
    b"",
    b"\xff\xfe",
    b"not json",
    b"[1, 2]",
    b'{"amount": NaN}',
    _wire(type="Unknown"),
    _wire(version=2),
    _wire(message_id="not-a-uuid"),
    _wire(extra="field"),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "1.001"}),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a"}),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "1", "x": 1}),
])
def test_values_that_break_the_contract_are_malformed(value):
    with pytest.raises(MalformedMessage):
        decode(value)


@pytest.mark.parametrize("changes, why", [
    ({"type": "PaymentRefunded"}, "unknown message type 'PaymentRefunded'"),
    ({"payload": {"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "1", "x": 1}},
     "PaymentRequested payload breaks the contract"),
])
def test_a_well_formed_envelope_whose_payload_is_refused_keeps_its_id_and_payload(changes, why):
    """What a producer newer than its reader sends: the reader refuses it, but can say which
    message it was and what it held (shared/inbox.py keeps it to be replayed)."""
    body = json.loads(_wire(**changes))
    with pytest.raises(PayloadRefused, match=why) as refused:
        decode(json.dumps(body).encode())
    envelope = refused.value.envelope
    assert str(envelope["message_id"]) == body["message_id"]
    assert (envelope["type"], envelope["payload"]) == (body["type"], body["payload"])


def test_an_envelope_that_breaks_its_own_contract_is_not_kept_by_its_id():
    for value in (_wire(version=2), _wire(extra="field"), _wire(type="")):
        with pytest.raises(MalformedMessage) as refused:
            decode(value)
        assert not isinstance(refused.value, PayloadRefused)
