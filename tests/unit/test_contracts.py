import json
import logging
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

import orders_app
import payments_app
from shared import contracts
from shared.config import ENVIRONMENT, load_settings
from shared.contracts import (PAYMENT_FAILED, PAYMENT_REQUESTED, MalformedMessage, PayloadRefused,
                              decode, encode, new_event)


ORDER_1 = uuid.UUID("00000000-0000-4000-8000-000000000001")


def _request_event():
    return new_event(
        PAYMENT_REQUESTED,
        {"order_id": ORDER_1, "user_id": "alice", "amount": Decimal("30.00")},
    )


def test_an_event_survives_the_wire_with_amounts_as_strings():
    event = _request_event()
    wire = encode(event.to_json())
    body = json.loads(wire)
    assert body["payload"]["amount"] == "30.00"
    assert body["version"] == 1
    assert set(body) == {"message_id", "type", "version", "occurred_at", "correlation_id",
                         "causation_id", "payload"}
    decoded = decode(wire)
    assert decoded.message_id == event.message_id
    assert decoded.payload == event.payload
    assert decoded.correlation_id == str(ORDER_1)


def test_a_new_event_keeps_the_wire_form_it_checked_and_a_decoded_one_builds_it():
    event = _request_event()
    decoded = decode(encode(event.to_json()))
    assert event.wire_payload is not None and decoded.wire_payload is None
    assert event.payload_json() == decoded.payload_json() == {
        "order_id": str(event.payload["order_id"]), "user_id": "alice", "amount": "30.00"}
    assert decoded == event  # the wire form is a cache, not part of the event


def test_the_writer_writes_the_causation_id_it_is_given_and_null_when_none():
    event = _request_event()
    assert json.loads(event.to_wire())["causation_id"] is None  # no request led to it
    caused = event.caused_by("click-12345678")
    assert caused.caused_by("click-12345678") is caused
    body = json.loads(caused.to_wire())
    assert body["causation_id"] == "click-12345678" and body["correlation_id"] == str(ORDER_1)
    assert caused.payload_json() == event.payload_json()  # the checked wire form kept
    assert decode(caused.to_wire().encode()).causation_id == "click-12345678"


@pytest.mark.parametrize("causation", [
    {},  # written before the field was: read as none
    {"causation_id": None},
    {"causation_id": "click-12345678"},
    {"causation_id": "not, a sane request id"},  # read all the same: it is only told on
], ids=["absent", "null", "an id", "no sane id"])
def test_a_reader_takes_an_envelope_with_or_without_a_causation_id(causation, caplog,
                                                                   monkeypatch):
    monkeypatch.setattr(contracts, "_dropped_fields_said", set())
    caplog.set_level(logging.INFO, logger="shared.contracts")
    body = _request_event().to_json()
    del body["causation_id"]
    decoded = decode(json.dumps(body | causation).encode())
    assert decoded.causation_id == causation.get("causation_id")
    assert (decoded.type, decoded.correlation_id) == (PAYMENT_REQUESTED, str(ORDER_1))
    assert not caplog.records  # a field this reader knows: nothing said dropped


@pytest.mark.parametrize("no_text", [12345678, {"id": "click-1"}, ["click-1"], True])
def test_a_causation_id_that_is_no_text_is_read_as_none_not_refused(no_text):
    # (Only told on: a message is never parked, its order left NEW, for the shape of an id.)
    decoded = decode(_wire(causation_id=no_text))
    assert decoded.causation_id is None and decoded.type == PAYMENT_REQUESTED


def test_a_new_event_must_follow_its_contract():
    with pytest.raises(MalformedMessage):
        new_event(PAYMENT_FAILED, {"order_id": uuid.uuid4(), "user_id": "bob",
                                   "amount": Decimal("1.00"), "reason": "BECAUSE"})


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
    _wire(version="1"),
    _wire(message_id="not-a-uuid"),
    _wire(occurred_at="yesterday"),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "1.001"}),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a"}),
    _wire(payload={"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "0", "x": 1}),
])
def test_values_that_break_the_contract_are_malformed(value):
    with pytest.raises(MalformedMessage):
        decode(value)


@pytest.mark.parametrize("changes, why", [
    ({"type": "PaymentRefunded"}, "unknown message type 'PaymentRefunded'"),
    ({"payload": {"order_id": str(uuid.uuid4()), "user_id": "a", "amount": "-1", "x": 1}},
     "PaymentRequested payload breaks the contract"),
])
def test_a_well_formed_envelope_whose_payload_is_refused_keeps_its_id_and_payload(changes, why):
    """What a producer newer than its reader sends: the reader refuses it, but can say which
    message it was and what it held (shared/inbox/storing.py keeps it to be replayed)."""
    body = json.loads(_wire(**changes))
    with pytest.raises(PayloadRefused, match=why) as refused:
        decode(json.dumps(body).encode())
    envelope = refused.value.envelope
    assert str(envelope["message_id"]) == body["message_id"]
    assert (envelope["type"], envelope["payload"]) == (body["type"], body["payload"])


def test_an_envelope_that_breaks_its_own_contract_is_not_kept_by_its_id():
    for value in (_wire(version="2"), _wire(version=0), _wire(version=2**15), _wire(version=True),
                  _wire(version=2.0), _wire(version=[2]), _wire(version=None), _wire(type=""),
                  _wire(version=2, message_id="not-a-uuid"), _wire(version=2, payload=[1]),
                  _wire(occurred_at="yesterday")):
        with pytest.raises(MalformedMessage) as refused:
            decode(value)
        assert not isinstance(refused.value, PayloadRefused)


def test_an_envelope_of_a_version_the_reader_does_not_know_is_refused_and_kept_by_its_id():
    """What a producer newer than its reader sends once the envelope changes: the reader refuses
    it, but keeps what every version carries (its id, type, version and payload), whatever else
    the new version changed, so that it can be read again once the reader knows the version."""
    body = json.loads(_wire(version=2, extra="field"))
    body["sent_at"] = body.pop("occurred_at")
    with pytest.raises(PayloadRefused, match="envelope version 2 is not one this reader knows"
                                             r" \(1\)") as refused:
        decode(json.dumps(body).encode())
    envelope = refused.value.envelope
    assert str(envelope["message_id"]) == body["message_id"]
    assert (envelope["type"], envelope["version"], envelope["payload"],
            envelope["correlation_id"]) == (body["type"], 2, body["payload"], str(ORDER_1))

    del body["correlation_id"]
    with pytest.raises(PayloadRefused) as refused:
        decode(json.dumps(body | {"type": "PaymentRefunded"}).encode())
    assert refused.value.envelope["correlation_id"] is None


def test_an_envelope_version_the_reader_has_come_to_know_is_read(monkeypatch):
    monkeypatch.setattr(contracts, "KNOWN_ENVELOPE_VERSIONS", frozenset({1, 2}))
    decoded = decode(_wire(version=2))
    assert decoded.version == 2 and decoded.type == PAYMENT_REQUESTED
    body = json.loads(_wire(version=2))
    del body["occurred_at"]
    with pytest.raises(MalformedMessage, match="occurred_at"):  # all of a version it knows
        decode(json.dumps(body).encode())


def test_a_field_a_newer_producer_added_to_the_payload_is_taken_and_dropped():
    """A rolling upgrade: the producer's new version adds an optional field before its readers
    know it. The message is read (not parked), and the field goes no further than the reader."""
    body = json.loads(_wire())
    body["payload"]["channel"] = "web"
    decoded = decode(json.dumps(body).encode())
    assert set(decoded.payload) == set(decoded.payload_json()) == {"order_id", "user_id", "amount"}
    assert decoded.payload["amount"] == Decimal("30.00")


def test_the_fields_a_reader_drops_are_said_once_for_each_kind(caplog, monkeypatch):
    """During a rolling upgrade the operator sees which fields a newer producer writes that this
    reader drops, once, not for every message."""
    monkeypatch.setattr(contracts, "_dropped_fields_said", set())
    caplog.set_level(logging.INFO, logger="shared.contracts")
    body = json.loads(_wire(trace={"id": 1}))
    body["payload"]["channel"] = "web"
    for _ in range(3):
        decode(json.dumps(body).encode())
    decode(_wire())  # (nothing dropped: nothing said)
    assert [record.getMessage() for record in caplog.records] == [
        "PaymentRequested messages carry fields this reader does not know, read without them:"
        " in the envelope ['trace'], in the payload ['channel']"]


def test_a_field_a_newer_producer_added_to_the_envelope_is_taken():
    decoded = decode(_wire(schema_hint="payments/v2", trace={"id": 1}))
    assert decoded.type == PAYMENT_REQUESTED and decoded.version == 1


@pytest.mark.parametrize("payload_changes", [
    {"amount": "ten", "channel": "web"},
    {"amount": None, "channel": "web"},
    {"order_id": 7, "channel": "web"},
])
def test_a_known_field_is_still_refused_beside_an_unknown_one(payload_changes):
    body = json.loads(_wire())
    body["payload"] |= payload_changes
    with pytest.raises(PayloadRefused, match="PaymentRequested payload breaks the contract"):
        decode(json.dumps(body).encode())


def test_a_reason_a_reader_does_not_know_is_still_refused():
    body = json.loads(_wire(type=PAYMENT_FAILED))
    body["payload"] |= {"reason": "CARD_EXPIRED", "channel": "web"}
    with pytest.raises(PayloadRefused):
        decode(json.dumps(body).encode())


def test_the_shop_never_writes_a_field_its_contract_does_not_declare():
    with pytest.raises(MalformedMessage, match=r"does not declare: \['channel'\]"):
        new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": "alice",
                                      "amount": Decimal("30.00"), "channel": "web"})


# The event contract as the issue that made the shop fixed it for readers outside it too (README:
# Event contract): each type's topic, the variable that renames it, and its payload's fields.
# Written out, not read from the code, so that a topic or a field renamed there fails here.
EVENT_CONTRACT = {
    "PaymentRequested": ("TOPIC_PAYMENT_REQUESTED", "orders.payment-requested",
                         {"order_id", "user_id", "amount"}),
    "PaymentSucceeded": ("TOPIC_PAYMENT_RESULTS", "payments.payment-results",
                         {"order_id", "user_id", "amount"}),
    "PaymentFailed": ("TOPIC_PAYMENT_RESULTS", "payments.payment-results",
                      {"order_id", "user_id", "amount", "reason"}),
    "OrderStatusChanged": ("TOPIC_ORDER_STATUS_CHANGED", "orders.order-status-changed",
                           {"order_id", "user_id", "amount", "status", "reason", "updated_at"}),
}


def _topic_of_each_event_type(environ: dict[str, str]) -> dict[str, str]:
    """The topic each event type is written to, as the services that write them say."""
    settings = load_settings(environ)
    return {event_type: topic for service in (orders_app, payments_app)
            for topic, types in service.published_events(settings).items()
            for event_type in types}


def test_each_event_type_goes_to_the_topic_of_the_contract_which_its_variable_renames():
    assert _topic_of_each_event_type({}) == {
        event_type: topic for event_type, (_, topic, _) in EVENT_CONTRACT.items()}
    renamed = {variable: f"renamed.{topic}" for variable, topic, _ in EVENT_CONTRACT.values()}
    assert _topic_of_each_event_type(renamed) == {
        event_type: renamed[variable] for event_type, (variable, _, _) in EVENT_CONTRACT.items()}
    assert {variable: ENVIRONMENT[variable] for variable, _, _ in EVENT_CONTRACT.values()} == {
        variable: topic for variable, topic, _ in EVENT_CONTRACT.values()}


@pytest.mark.parametrize("event_type", EVENT_CONTRACT)
def test_each_event_type_is_written_with_exactly_the_payload_fields_of_the_contract(event_type):
    order_id = uuid.uuid4()
    values = {"order_id": order_id, "user_id": "alice", "amount": Decimal("30.00"),
              "reason": "NO_ACCOUNT", "status": "CANCELLED",
              "updated_at": datetime.now(timezone.utc)}
    fields = EVENT_CONTRACT[event_type][2]
    event = new_event(event_type, {name: values[name] for name in fields})
    body = json.loads(encode(event.to_json()))
    assert (body["type"], set(body["payload"])) == (event_type, fields)
    assert body["payload"]["amount"] == "30.00" and body["correlation_id"] == str(order_id)
    for missing in fields:
        with pytest.raises(MalformedMessage):
            new_event(event_type, {name: values[name] for name in fields - {missing}})
