"""The chaos soak's copies of published payment requests (bench/chaos/resent_requests.py): a copy
is the message the orders relay sent, under a fresh message id, in its envelope and its header
alike, so that the payments inbox takes it for a message of its own; drawing the copies leaves the
disruptor's own draws to the seed, and a broker failing the resend fails no soak."""

from __future__ import annotations

import uuid
from decimal import Decimal
from functools import partial

from confluent_kafka import KafkaError, KafkaException

from bench.chaos import resent_requests
from bench.chaos.disruptions import Disruptor
from bench.chaos.plan import ChaosPlan
from bench.chaos.resent_requests import with_a_fresh_id
from shared.config import load_settings
from shared.contracts import PAYMENT_REQUESTED, decode, new_event
from shared.outbox.relaying import relay_headers


def test_a_copy_is_the_relays_message_but_for_a_fresh_message_id_in_envelope_and_header():
    order_id = uuid.uuid4()
    event = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": "u1",
                                          "amount": Decimal("12.50")})
    value = event.to_wire().encode()
    headers = [(name, header.encode()) for name, header in
               relay_headers(str(event.message_id), PAYMENT_REQUESTED, "req-1").items()]

    copy, copy_headers = with_a_fresh_id(value, headers)

    copied = decode(copy)
    assert copied.message_id != event.message_id
    assert dict(copy_headers) == {**dict(headers), "message_id": str(copied.message_id).encode()}
    assert (copied.type, copied.payload, copied.correlation_id, copied.occurred_at) == (
        PAYMENT_REQUESTED, decode(value).payload, str(order_id), event.occurred_at)
    # Byte for byte the relay's text but for the id (compact JSON, its keys in their order).
    assert copy.replace(str(copied.message_id).encode(), str(event.message_id).encode()) == value


class _Producer:
    """confluent-kafka's Producer as far as resend_with_fresh_ids uses it, every message
    acknowledged at the flush."""

    def __init__(self, config: dict):
        self.on_delivery, self.produced = config["on_delivery"], 0

    def produce(self, topic, value, key, headers):
        self.produced += 1

    def flush(self, timeout):
        for _ in range(self.produced):
            self.on_delivery(None, None)


def _published(count: int) -> list:
    records = []
    for _ in range(count):
        order_id = uuid.uuid4()
        event = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": "u1",
                                              "amount": Decimal("1.00")})
        records.append((str(order_id).encode(), event.to_wire().encode(),
                        [("message_id", str(event.message_id).encode())]))
    return records


def test_the_disruptors_own_draws_after_a_resend_are_the_same_however_many_were_published(
        monkeypatch):
    """How many were published is timing: the seed alone decides the disruptor's later waits,
    pauses and deck."""
    monkeypatch.setattr(resent_requests, "Producer", _Producer)
    states = []
    for count in (1, 5, resent_requests.COPIES, 300):
        monkeypatch.setattr(resent_requests, "_published",
                            lambda settings, topic, count=count: _published(count))
        resend = partial(resent_requests.resend_with_fresh_ids, load_settings({}))
        disruptor = Disruptor(ChaosPlan(seed=7), {}, lambda process: True, resend,
                              lambda message: None)
        assert disruptor._resend_payment_requests()
        states.append(disruptor.rng.getstate())
    assert states == [states[0]] * 4


def test_a_broker_failing_the_resend_is_said_and_the_kind_put_back_under_the_deck():
    def resend(rng):
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "metadata not answered"))
    said = []
    disruptor = Disruptor(ChaosPlan(seed=7), {}, lambda process: True, resend, said.append)
    assert disruptor._resend_payment_requests() is False
    assert said == ["payment requests not sent again: KafkaError{code=_TIMED_OUT,val=-185,"
                    'str="metadata not answered"}']
