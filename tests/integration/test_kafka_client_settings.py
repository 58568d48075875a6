"""The shop's Kafka clients as shared.kafka configures them, against a broker of the test's own."""

from __future__ import annotations

import dataclasses
import uuid

from confluent_kafka.admin import AdminClient

from devstack.infra import free_port, start_broker
from shared.kafka import ensure_topics
from shared.outbox.publishing import OutboxPublisher


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

