"""Reading and writing topics directly in tests, as an outside client would."""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list:
    """The first `count` messages of `topic`, from every partition (no consumer group involved)."""
    messages = read_topic_until(bootstrap, topic, lambda read: len(read) >= count, timeout)
    assert len(messages) == count, f"read {len(messages)} of {count} messages from {topic}"
    return messages


def read_topic_until(bootstrap: str, topic: str, enough, timeout: float = 20.0) -> list:
    """Messages of `topic` from the beginning, read until `enough(messages)` holds or time is up."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                         "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while partitions is None:
            metadata = consumer.list_topics(topic, timeout=5).topics.get(topic)
            if metadata is not None and metadata.error is None and metadata.partitions:
                partitions = list(metadata.partitions)
            elif time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} never appeared")
            else:
                time.sleep(0.1)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages = []
        while not enough(messages) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
        return messages
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, value: bytes, key: bytes | None = None,
            headers: dict[str, str] | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors = []
    producer.produce(topic, value=value, key=key,
                     headers=[(k, v.encode()) for k, v in (headers or {}).items()],
                     on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(15)
    assert errors == [None], f"broker did not acknowledge: {errors}"
