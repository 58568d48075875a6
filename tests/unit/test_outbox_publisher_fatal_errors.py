"""OutboxPublisher and the idempotent producer's fatal errors, with the real client against
librdkafka's own mock cluster (tests/librdkafka_mock.py): unit-level tests, in one process, of
what the broker the integration tests run cannot be made to answer (a sequence number out of
order, an idempotent producer refused its producer id), which leave a producer unusable."""

from __future__ import annotations

import gc
import json
import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from shared.config import load_settings
from shared.outbox.publishing import OutboxPublisher
from tests.kafka_tools import librdkafka_threads, read_topic, wait_for_librdkafka_threads
from tests.librdkafka_mock import INIT_PRODUCER_ID, PRODUCE, MockCluster
from tests.polling import wait_for

TOPIC = "fatal-errors"

# (request, error, rows sent before it): a fatal error as the producer sends, or as it starts.
FATAL_ANSWERS = {
    "out-of-order sequence number": (PRODUCE, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, 2),
    "producer id refused": (INIT_PRODUCER_ID, KafkaError.CLUSTER_AUTHORIZATION_FAILED, 0),
}


def _rows(first: int, last: int) -> list[tuple]:
    return [(n, TOPIC, "key", f"m{n}", "PaymentRequested", None, json.dumps({"n": n}))
            for n in range(first, last + 1)]


@pytest.fixture
def cluster():
    with MockCluster() as cluster:
        cluster.create_topic(TOPIC)
        yield cluster


@pytest.mark.parametrize("request_, error, sent_before", FATAL_ANSWERS.values(),
                         ids=FATAL_ANSWERS.keys())
def test_a_producer_failed_fatally_refuses_its_batch_says_why_and_is_replaced(
        cluster, caplog, request_, error, sent_before):
    """confluent-kafka raises a fatal error from flush() (and poll()), not as a delivery report:
    the batch's rows are refused, none counted as sent (their reports are cut short), the error
    is logged, and the next batch has a new producer, which sends them."""
    publisher = OutboxPublisher(load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap}),
                                "orders", topics=[TOPIC])
    if sent_before:
        assert publisher.send_batch(_rows(1, sent_before)) == {}
    batch = _rows(sent_before + 1, sent_before + 3)
    name = KafkaError(error).name()

    cluster.answer_next_requests_with(request_, error)
    with caplog.at_level(logging.ERROR, logger="shared.outbox.publishing"):
        refused = publisher.send_batch(batch)
    assert set(refused) == {row[0] for row in batch}
    assert all(name in r.error for r in refused.values())
    # (The broker answered: no sign of a way to it broken, for the leader's count.)
    assert all(r.answered and not (r.held or r.park) for r in refused.values())
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "orders" in said and "fatal" in said and name in said

    assert publisher.send_batch(batch) == {}  # tried again, as the relay does
    messages = read_topic(cluster.bootstrap, TOPIC, sent_before + 3)
    assert [json.loads(m.value())["n"] for m in messages] == list(range(1, sent_before + 4))


def test_a_producer_replaced_after_a_fatal_error_is_let_go_with_its_threads(cluster):
    """confluent-kafka keeps the exceptions it raises for a fatal error: through their
    tracebacks they would keep every replaced producer, and its threads and connection."""
    gc.collect()  # (producers of earlier tests let go)
    threads_before = librdkafka_threads()
    publisher = OutboxPublisher(load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap}),
                                "orders", topics=[TOPIC])
    for first in (1, 10, 20):
        assert publisher.send_batch(_rows(first, first + 1)) == {}
        assert librdkafka_threads() > threads_before  # (the producer's)
        cluster.answer_next_requests_with(PRODUCE, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
        assert publisher.send_batch(_rows(first + 2, first + 2))
        wait_for_librdkafka_threads(threads_before)


def test_a_producer_failed_fatally_after_its_last_batch_is_closed_with_a_warning_not_an_error(
        cluster, caplog):
    """close() is called as the publisher's owner ends, often on its way out of an error of its
    own: a producer that failed fatally after its last batch returned (the broker refusing a
    message that batch gave up on, say; here one produced after it) raises nothing there, its
    error is said in a warning, and it is let go, threads and all; closing again does nothing."""
    gc.collect()  # (producers of earlier tests let go)
    threads_before = librdkafka_threads()
    publisher = OutboxPublisher(load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap}),
                                "orders", topics=[TOPIC])
    assert publisher.send_batch(_rows(1, 2)) == {}
    cluster.answer_next_requests_with(PRODUCE, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
    wait_for(lambda: _failed_fatally(publisher._producer), timeout=10,
             what="the producer to fail fatally")
    with caplog.at_level(logging.WARNING, logger="shared.outbox.publishing"):
        publisher.close()
        publisher.close()
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "orders" in said and "OUT_OF_ORDER_SEQUENCE_NUMBER" in said
    wait_for_librdkafka_threads(threads_before)


def _failed_fatally(producer) -> bool:
    """Whether `producer` is in a fatal state: it then refuses every message with _FATAL (one it
    takes before is refused with the fatal error)."""
    try:
        producer.produce(TOPIC, b"after the batch", key=b"key")
    except KafkaException as exc:
        return exc.args[0].code() == KafkaError._FATAL
    return False
