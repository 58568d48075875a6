"""OutboxPublisher and the record batches the broker refuses for one record in them, with the real
client against librdkafka's own mock cluster (tests/librdkafka_mock.py): the broker the
integration tests run answers neither a record over the topic's max.message.bytes nor one its
validation fails (INVALID_RECORD) as Kafka does, and librdkafka fails every message of such a
batch alike."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import KafkaError

from shared.config import load_settings
from shared.outbox.publishing import OutboxPublisher
from tests.kafka_tools import read_topic
from tests.librdkafka_mock import PRODUCE, MockCluster

TOPIC = "record-refusals"


def _row(n: int, key: str) -> tuple:
    return (n, TOPIC, key, f"m{n}", "PaymentRequested", None, json.dumps({"n": n}))


@pytest.fixture
def cluster():
    with MockCluster() as cluster:
        cluster.create_topic(TOPIC)  # one partition: every row in one record batch
        yield cluster


@pytest.mark.parametrize("error", [KafkaError.INVALID_RECORD, KafkaError.MSG_SIZE_TOO_LARGE],
                         ids=["invalid record", "too large"])
def test_of_a_record_batch_refused_for_a_record_the_one_refused_alone_is_parked_and_the_rest_go(
        cluster, error):
    """The broker refuses the whole record batch for one record in it (a compacted topic's record
    without a key, say), and will refuse that record every time: each row is sent again alone,
    the one refused again is parked with the broker's error, the rows of its key after it wait
    behind it, and every other row goes, in its order. (Not parked, the batch was refused at
    every try, for ever, and with it every row of its key and of its partition's batch.)"""
    publisher = OutboxPublisher(load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap}),
                                "orders", topics=[TOPIC])
    batch = [_row(1, "ann"), _row(2, "ann"), _row(3, "bob"), _row(4, "ann"), _row(5, "bob")]
    name = KafkaError(error).name()
    # Produce requests, in turn: the batch (the producer's first, so all five wait for its
    # producer id and go as one), then each row alone: ann's 1st, her 2nd (the record to blame),
    # bob's 1st and 2nd (ann's 3rd, behind her 2nd, is not sent).
    cluster.answer_next_requests_with(PRODUCE, error, KafkaError.NO_ERROR, error)

    refused = publisher.send_batch(batch)

    assert set(refused) == {2, 4}
    assert refused[2].park and refused[2].held and refused[2].answered
    assert refused[2].error.startswith(f"{name}: ")
    assert refused[4].held and not refused[4].park
    assert refused[4].error.startswith("held back") and name in refused[4].error
    assert _sent(cluster, 3) == [1, 3, 5]

    # Mended and handed back (tasks.parked replay), it goes before the row of ann's behind it.
    assert publisher.send_batch([batch[1], batch[3]]) == {}
    assert _sent(cluster, 5) == [1, 3, 5, 2, 4]


def _sent(cluster: MockCluster, count: int) -> list[int]:
    """The rows on the topic, in its order (its one partition's)."""
    return [json.loads(m.value())["n"] for m in read_topic(cluster.bootstrap, TOPIC, count)]
