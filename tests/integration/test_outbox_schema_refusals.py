"""OutboxPublisher against a broker that validates records, Tansu with its schema registry (a
broker of the test's own): a record batch refused as INVALID_RECORD for one record in it. The
refusal bumps the idempotent producer's epoch, and Tansu then answers PRODUCER_FENCED for every
message that producer sends; the rows are sent again alone each on a producer the broker has
refused nothing, so that the one to blame is found and parked. (librdkafka's mock cluster, in
tests/unit/test_outbox_publisher_record_refusals.py, fences nothing.)"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from devstack.infra import free_port, start_broker
from shared.kafka import ensure_topics
from shared.outbox.publishing import OutboxPublisher
from tests.kafka_tools import librdkafka_threads, read_topic, wait_for_librdkafka_threads

TOPIC = "validated"

# Tansu validates a record's value against `properties.value` of its topic's schema.
SCHEMA = {"type": "object", "properties": {"value": {
    "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}


@pytest.fixture
def validating_broker(settings, run_dir, note_started) -> Iterator:
    """Settings for a broker of the test's own whose schema registry has SCHEMA for TOPIC (one
    partition: a batch's rows go in one record batch)."""
    folder = run_dir / "validating-broker"
    schemas = folder / "schemas"
    schemas.mkdir(parents=True)
    (schemas / f"{TOPIC}.json").write_text(json.dumps(SCHEMA))
    port = free_port()
    broker = start_broker(port, folder, on_start=note_started, schemas=schemas)
    try:
        own = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}",
                                  kafka_topic_partitions=1)
        ensure_topics(own, [TOPIC])
        yield own
    finally:
        broker.stop()


def _row(n: int, key: str, valid: bool = True) -> tuple:
    value = {"n": n} if valid else {"not n": n}
    return (n, TOPIC, key, f"m{n}", "PaymentRequested", None, json.dumps(value))


def test_the_record_of_a_batch_the_broker_refuses_as_invalid_is_parked_and_the_others_go(
        validating_broker):
    """README: "a record batch refused as INVALID_RECORD for one record in it: that record is
    parked, the others go", the later rows of its key held back behind it. (Sent again alone on
    the producer whose batch was refused, every row was refused PRODUCER_FENCED: none parked,
    and the batch refused whole again at every try, its keys stopped for ever.)"""
    threads_before = librdkafka_threads()
    publisher = OutboxPublisher(validating_broker, "orders", topics=[TOPIC])
    batch = [_row(1, "ann"), _row(2, "bob"), _row(3, "ann", valid=False), _row(4, "bob"),
             _row(5, "ann"), _row(6, "cy")]
    try:
        refused = publisher.send_batch(batch)

        assert set(refused) == {3, 5}, {n: r.error for n, r in refused.items()}
        assert refused[3].park and refused[3].held and refused[3].answered
        assert refused[3].error.startswith("INVALID_RECORD: ")
        assert refused[5].held and not refused[5].park  # ann's later row waits behind it
        assert refused[5].error.startswith("held back") and "INVALID_RECORD" in refused[5].error
        sent = read_topic(validating_broker.kafka_bootstrap_servers, TOPIC, 4)
        assert [json.loads(m.value())["n"] for m in sent] == [1, 2, 4, 6]

        # The producer left for the next batch is sound: it sends.
        assert publisher.send_batch([_row(7, "bob")]) == {}
    finally:
        publisher.close()
    wait_for_librdkafka_threads(threads_before)  # every producer replaced was closed
