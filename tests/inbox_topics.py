"""Topics of a test's own whose records the run's payments inbox stores: made on the
Kafka-protocol broker under a name no other test uses, and cleared away afterwards with their
inbox rows."""

from __future__ import annotations

import dataclasses
import uuid

from confluent_kafka.admin import AdminClient

from shared.kafka import new_topic


def new_topic_of_its_own(settings, name: str, partitions: int) -> tuple[str, AdminClient]:
    """A topic of its own for a test, `name` and a random suffix, of `partitions` partitions; with
    the admin client that made it, for the test to clear it away with (cleared_away)."""
    topic = f"{settings.kafka_consumer_group_prefix}.{name}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    partitioned = dataclasses.replace(settings, kafka_topic_partitions=partitions)
    admin.create_topics([new_topic(partitioned, topic)])[topic].result(15)
    return topic, admin


def cleared_away(topic: str, admin: AdminClient, database) -> None:
    """The test's topic deleted, and its records' rows in the inbox (the run's, shared by its
    tests) through `database`, a psycopg2 connection to it in autocommit, which is closed."""
    try:
        with database.cursor() as cursor:
            cursor.execute("DELETE FROM inbox_messages WHERE topic = %s", (topic,))
    finally:
        database.close()
        admin.delete_topics([topic])
