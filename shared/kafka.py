"""Thin wrappers around confluent-kafka: the producer's and consumers' settings, the shop's topics
created, and whether the broker is reachable. Publishing outbox rows with the producer is
shared.outbox.publishing's."""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from shared.config import Settings

log = logging.getLogger(__name__)

# librdkafka gives up on a message after this long; the relay waits a little longer than this
# (shared.outbox.publishing.FLUSH_TIMEOUT_S) so that every message gets a definite answer.
MESSAGE_TIMEOUT_MS = 5000


def producer_config(settings: Settings) -> dict:
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        "socket.connection.setup.timeout.ms": 3000,
        "reconnect.backoff.max.ms": 1000,
    }


# A consumer's on_commit: the result of each asynchronous offset commit (the error, None on
# success; the partitions with their offsets and, where one failed, its error), called from its
# poll() on the thread that polls.
OnCommit = Callable[[KafkaError | None, list[TopicPartition]], None]


def consumer_config(settings: Settings, group_id: str, on_commit: OnCommit | None = None) -> dict:
    config = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(settings.kafka_session_timeout_ms // 3, 500),
        "reconnect.backoff.max.ms": 1000,
        "topic.metadata.refresh.interval.ms": 5000,
        "fetch.wait.max.ms": 20,
        # Eager rebalancing (librdkafka's default, named so that it stays): a rebalance takes
        # every partition away, and each given back starts from its committed offset, which is
        # what shared/inbox_consumer.py's commits and rewinds rest on.
        "partition.assignment.strategy": "range,roundrobin",
    }
    if on_commit is not None:
        config["on_commit"] = on_commit
    return config


def build_consumer(settings: Settings, group_id: str,
                   on_commit: OnCommit | None = None) -> Consumer:
    return Consumer(consumer_config(settings, group_id, on_commit))


def ensure_topics(settings: Settings, topics: list[str], timeout: float = 5.0) -> None:
    """Create the topics that do not exist yet (several processes may race to do it)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    existing = admin.list_topics(timeout=timeout).topics
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    futures = admin.create_topics([new_topic(settings, t) for t in missing],
                                  operation_timeout=timeout, request_timeout=timeout)
    for topic, future in futures.items():
        try:
            future.result()
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def new_topic(settings: Settings, name: str) -> NewTopic:
    """A topic as the shop creates it: KAFKA_TOPIC_PARTITIONS partitions, each on
    KAFKA_TOPIC_REPLICATION_FACTOR brokers. With replicas, a write must reach all but one of them
    (`min.insync.replicas`; the producer asks for `acks=all`) before the relay deletes its row, so
    that a broker lost with it loses no message, while one broker down stops no writes."""
    replicas = settings.kafka_topic_replication_factor
    config = {"min.insync.replicas": str(replicas - 1)} if replicas > 2 else {}
    return NewTopic(name, num_partitions=settings.kafka_topic_partitions,
                    replication_factor=replicas, config=config)


def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    try:
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers}).list_topics(
            timeout=timeout
        )
        return True
    except KafkaException:
        return False

