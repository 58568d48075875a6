"""A disruption of the messages, not the processes: PaymentRequested messages already published,
sent again to their topic under fresh message ids, as a producer that re-sent them with new ids
would (the same key, envelope and headers as the orders relay sent, but the message id). The
payments inbox dedups by message id, so a copy is a message it has not seen: what keeps its order
to one payment is the payments handler's own check (its insert keyed by order id)."""

from __future__ import annotations

import json
import random
import time
import uuid

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka import Message as KafkaMessage

from shared.config import Settings
from shared.contracts import encode
from shared.kafka import MESSAGE_TIMEOUT_MS, producer_config

# Copies sent at each such disruption, of messages drawn from all those published so far.
COPIES = 20
# How long reading what was published may take (the whole topic, a few thousand records at most).
READ_SECONDS = 10
Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]  # key, value, headers


def with_a_fresh_id(value: bytes, headers: list[tuple[str, bytes]]
                    ) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A message's value and headers as a copy of it under a fresh message id: the envelope's
    `message_id` and the header of that name both the new id, all else as it was."""
    envelope = json.loads(value)
    fresh = str(uuid.uuid4())
    envelope["message_id"] = fresh
    return encode(envelope), [(name, fresh.encode() if name == "message_id" else header)
                              for name, header in headers]


def resend_with_fresh_ids(settings: Settings, rng: random.Random, copies: int = COPIES) -> int:
    """Up to `copies` of the PaymentRequested messages published so far, drawn at random, sent
    again under fresh ids to their topic; how many the broker acknowledged (0: none published
    yet, or none taken)."""
    published = _published(settings, settings.topic_payment_requested)
    chosen = rng.sample(published, min(copies, len(published)))
    acknowledged = []
    producer = Producer({**producer_config(settings), "on_delivery": lambda err, _message: (
        acknowledged.append(1) if err is None else None)})
    for key, value, headers in chosen:
        copy, copy_headers = with_a_fresh_id(value, headers)
        producer.produce(settings.topic_payment_requested, copy, key, headers=copy_headers)
    producer.flush(MESSAGE_TIMEOUT_MS / 1000 + 1)
    return len(acknowledged)


def _published(settings: Settings, topic: str) -> list[Record]:
    """Every record of `topic`, read from its start by a reader that joins no group (assigned
    its partitions, committing nothing), within READ_SECONDS (what was read by then, if not
    all)."""
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                       "group.id": f"{settings.kafka_consumer_group_prefix}.chaos-copies",
                       "enable.auto.commit": False, "enable.partition.eof": True,
                       "fetch.wait.max.ms": 20, "log_level": 0})
    deadline = time.monotonic() + READ_SECONDS
    try:
        known = reader.list_topics(timeout=READ_SECONDS).topics
        partitions = known[topic].partitions if topic in known else {}
        reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)
                       for partition in partitions])
        records: list[Record] = []
        at_end: set[int] = set()
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            message = reader.poll(0.05)
            if message is not None:
                _take(message, records, at_end)
        return records
    finally:
        reader.close()


def _take(message: KafkaMessage, records: list[Record], at_end: set[int]) -> None:
    error = message.error()
    if error is None:
        records.append((message.key(), message.value(), message.headers() or []))
    elif error.code() == KafkaError._PARTITION_EOF:
        at_end.add(message.partition())
    else:
        raise KafkaException(error)
