"""The shop's Kafka clients as shared.kafka configures them, against a broker of the test's own."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from devstack.infra import free_port, start_broker
from shared.kafka import build_consumer, ensure_topics, producer_config
from shared.outbox.publishing import OutboxPublisher
from tests.polling import wait_for

# How long the test's clients try a broker that is not there.
OUTAGE_SECONDS = 6.0


def _partitions(bootstrap: str) -> dict[str, int]:
    topics = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(
        timeout=5).topics
    return {name: len(topic.partitions) for name, topic in topics.items()}


def test_a_relay_batch_to_a_broker_without_its_topic_leaves_the_topic_for_the_shop_to_create(
        settings, run_dir, note_started):
    """A broker that lost its topics (Tansu, in memory, restarted) is sent a relay batch: the
    producer does not have the broker create the topic on first use, with the broker's defaults
    (Tansu's: 4 partitions); the row is refused, to be tried again, and the topic is then created
    as the relay creates it on a refusal (tasks.relay._ensure_topics), with the shop's
    KAFKA_TOPIC_PARTITIONS partitions."""
    port = free_port()
    broker = start_broker(port, run_dir / "no-auto-create", on_start=note_started)
    try:
        own_settings = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")
        topic = own_settings.topic_payment_requested
        publisher = OutboxPublisher(own_settings, "orders")
        try:
            refused = publisher.send_batch(
                [(1, topic, "user-1", str(uuid.uuid4()), "PaymentRequested", None, '{"n": 1}')])
        finally:
            publisher.close()
        assert set(refused) == {1} and not refused[1].park, refused
        assert topic not in _partitions(own_settings.kafka_bootstrap_servers)

        ensure_topics(own_settings, [topic])
        assert _partitions(own_settings.kafka_bootstrap_servers)[topic] == \
            own_settings.kafka_topic_partitions
    finally:
        broker.stop()


def test_a_broker_away_is_said_once_as_it_begins_and_once_as_it_ends_not_at_every_try(
        settings, run_dir, note_started, caplog, capfd):
    """A consumer and a producer made with the shop's settings try a broker that is not there
    (nothing listens on its port) for OUTAGE_SECONDS, then it starts: left to itself librdkafka
    printed a line to stderr at every try (the consumer some twenty a second). Said instead, in
    the Python log, for both clients together: once as the outage begins (a WARNING naming the
    broker and why), once as it ends (at INFO); nothing on stderr."""
    port = free_port()
    own_settings = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="shared.kafka")
    consumer = build_consumer(own_settings, f"broker-away-{uuid.uuid4().hex[:8]}")
    producer = Producer(producer_config(own_settings))
    broker = None
    try:
        consumer.subscribe([own_settings.topic_payment_results])
        producer.produce(own_settings.topic_payment_results, b"{}", b"user-1")

        def polled() -> None:
            consumer.poll(0.1)
            producer.poll(0)

        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:
            polled()
        broker = start_broker(port, run_dir / "broker-away", on_start=note_started)
        wait_for(lambda: polled() or _said(caplog, "reach broker"), timeout=30, interval=0.05,
                 what="the clients to say that the broker is back")
    finally:
        consumer.close()
        producer.purge()
        producer.flush(5)
        if broker is not None:
            broker.stop()
    lines = [f"{record.levelname} {record.getMessage()}" for record in caplog.records
             if record.name.startswith("shared.kafka")]
    stderr = [line for line in capfd.readouterr().err.splitlines() if "rdkafka" in line]
    address = f"127.0.0.1:{port}"
    assert len(lines) == 2, lines
    begun, over = lines
    assert begun.startswith(f"WARNING Kafka clients cannot connect to broker {address}: "), begun
    assert "Connection refused" in begun
    assert over.startswith(f"INFO Kafka clients reach broker {address} again after "), over
    assert stderr == []


def test_a_clients_other_lines_go_to_the_log_at_their_own_level(settings, caplog, capfd):
    """What librdkafka says that is not a broker out of reach (here a configuration warning; an
    authentication or TLS failure alike) is in the Python log as it said it, not on stderr."""
    caplog.set_level(logging.INFO, logger="shared.kafka")
    producer = Producer({**producer_config(settings), "auto.offset.reset": "earliest"})
    try:
        wait_for(lambda: producer.poll(0.1) is not None and _said(caplog, "auto.offset.reset"),
                 timeout=10, what="the producer's configuration warning")
    finally:
        producer.flush(5)
    [warning] = [record for record in caplog.records if "auto.offset.reset" in record.getMessage()]
    assert warning.name == "shared.kafka.librdkafka" and warning.levelno == logging.WARNING
    assert warning.getMessage().startswith("CONFWARN [rdkafka#producer-")
    assert "rdkafka" not in capfd.readouterr().err


def _said(caplog, words: str) -> bool:
    return any(words in record.getMessage() for record in caplog.records)
