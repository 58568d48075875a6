"""Thin wrappers around confluent-kafka: the producer's and consumers' settings, the shop's topics
created, and whether the broker is reachable. Publishing outbox rows with the producer is
shared.outbox.publishing's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from shared.config import Settings
from shared.kafka_logs import ClientLog
from shared.outage_log import OutageLog, OutageWords

log = logging.getLogger(__name__)

# librdkafka gives up on a message after this long; the relay waits a little longer than this
# (shared.outbox.publishing.FLUSH_TIMEOUT_S) so that every message gets a definite answer.
MESSAGE_TIMEOUT_MS = 5000


def producer_config(settings: Settings) -> dict:
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        # Its lines to the Python log, a broker away said once an outage (shared.kafka_logs).
        "logger": ClientLog(settings.kafka_bootstrap_servers),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        "socket.connection.setup.timeout.ms": 3000,
        "reconnect.backoff.max.ms": 1000,
        # A topic the broker does not have is never created by a message sent to it (librdkafka
        # asks the broker to, by default, and a broker that creates topics on first use gives it
        # its own defaults: num.partitions, one replica, no min.insync.replicas; Tansu, 4
        # partitions). The message waits for its topic until it times out, and the relay, refused,
        # creates the shop's topics as the shop makes them (ensure_topics, new_topic).
        "allow.auto.create.topics": False,
    }


# A consumer's on_commit: the result of each asynchronous offset commit (the error, None on
# success; the partitions with their offsets and, where one failed, its error), called from its
# poll() on the thread that polls.
OnCommit = Callable[[KafkaError | None, list[TopicPartition]], None]


def consumer_config(settings: Settings, group_id: str, on_commit: OnCommit | None = None) -> dict:
    config = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "logger": ClientLog(settings.kafka_bootstrap_servers),  # (as the producer's)
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


def records_unread_by(bootstrap_servers: str, group_id: str, topics: list[str],
                      timeout: float = 2.0) -> int | None:
    """How many records of `topics` the consumer group `group_id` has not committed yet (its lag),
    or None if they could not all be counted within `timeout`. They are read, from each
    partition's committed offset (its first, where the group committed none) to its end, not
    worked out from the high watermark: Tansu 0.6.0 answers a partition's (ListOffsets, a fetch)
    with its last batch's first offset plus one, short of the batch's other records.

    The probe never joins the group: it asks the group's committed offsets (OffsetFetch) and
    reads its partitions assigned, not subscribed, commits nothing and, having no member id,
    sends no LeaveGroup as it closes. So the group's consumers see no rebalance (which Tansu can
    wedge: README, Running it locally)."""
    deadline = time.monotonic() + timeout
    probe = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group_id,
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "fetch.wait.max.ms": 20, "log_level": 0})
    try:
        existing = probe.list_topics(timeout=timeout).topics
        partitions = [TopicPartition(topic, partition) for topic in topics if topic in existing
                      for partition in existing[topic].partitions]
        if not partitions:
            return 0
        committed = probe.committed(partitions, timeout=max(deadline - time.monotonic(), 0.1))
        probe.assign([TopicPartition(p.topic, p.partition,
                                     p.offset if p.offset >= 0 else OFFSET_BEGINNING)
                      for p in committed])
        unread, at_end = 0, set()
        while len(at_end) < len(partitions):
            if time.monotonic() >= deadline:
                return None
            record = probe.poll(0.05)
            if record is None:
                continue
            if record.error() is None:
                unread += 1
            elif record.error().code() == KafkaError._PARTITION_EOF:
                at_end.add((record.topic(), record.partition()))
            else:
                raise KafkaException(record.error())
        return unread
    finally:
        probe.close()


def ensure_topics(settings: Settings, topics: list[str], timeout: float = 5.0) -> None:
    """Create the topics that do not exist yet (several processes may race to do it)."""
    admin = quiet_admin_client(settings)  # (a broker away: it raises, and the caller says so)
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
    KAFKA_TOPIC_REPLICATION_FACTOR brokers. With three or more, a write must reach all in-sync
    replicas but one (`min.insync.replicas`; the producer asks for `acks=all`) before the relay
    deletes its row, so that a broker lost with it loses no message, while one broker down stops
    no writes. With two, the broker's own `min.insync.replicas` holds (1 by default: a write the
    leader alone took, its follower behind, is lost with that broker)."""
    replicas = settings.kafka_topic_replication_factor
    config = {"min.insync.replicas": str(replicas - 1)} if replicas > 2 else {}
    return NewTopic(name, num_partitions=settings.kafka_topic_partitions,
                    replication_factor=replicas, config=config)


# What a health check says of a broker it cannot reach (shared.outage_log): once as the outage
# begins, once a reminder's interval on, and as it ends, not once a round of checks.
BROKER_OUTAGE_WORDS = OutageWords(
    begun="%(what)s cannot reach the broker: %(said)s",
    still="%(what)s still cannot reach the broker after %(seconds).0f s (%(tries)d rounds of"
          " checks): %(said)s",
    over="%(what)s reaches the broker again after %(seconds).0f s")


def broker_reachable(settings: Settings, timeout: float = 2.0,
                     outage: OutageLog | None = None) -> bool:
    """Whether the broker answers a metadata request within `timeout`. Asked by every round of
    health checks: librdkafka is told to log nothing (quiet_admin_client), where it printed a line
    to stderr for each refused connect, some forty a check with the broker down; why the broker is
    unreachable (librdkafka's error) is told to `outage` instead, which says it once an outage."""
    try:
        quiet_admin_client(settings).list_topics(timeout=timeout)
    except KafkaException as exc:
        if outage is not None:
            outage.failed(str(exc))
        return False
    if outage is not None:
        outage.back()
    return True


def quiet_admin_client(settings: Settings) -> AdminClient:
    """An AdminClient that logs nothing (`log_level` 0): what it fails at, it raises. (Its lines
    would reach a `logger` only through a poll() of its own, which nothing calls.)"""
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0})

