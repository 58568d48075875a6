"""What the inbox consumer makes of records other producers write to its topic (a bad deploy, a
replay tool, kcat), on the Kafka-protocol broker and PostgreSQL: each is stored, parked with its
reason where it cannot be handled, said so in the log, and committed past, never left to block its
partition; but for a record batch the client cannot read at all, which holds its partition (its
records may be messages) and is said once."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import psycopg2
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import driver_dsn
from shared.inbox_consumer import InboxConsumer, StoreOnOwnConnection
from shared.kafka import build_consumer
from shared.request_context import REQUEST_ID_KAFKA_HEADER, RequestIdLogFilter
from tests.inbox_topics import cleared_away, new_topic_of_its_own
from tests.kafka_tools import produce_unreadable_batch
from tests.polling import wait_for


@pytest.fixture
def topic(settings) -> Iterator[str]:
    """A topic of the test's own, of one partition, cleared away with its inbox rows afterwards."""
    name, admin = new_topic_of_its_own(settings, "odd-records", partitions=1)
    yield name
    database = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    database.autocommit = True
    cleared_away(name, admin, database)


def _produce(settings, topic: str, values: list[bytes | None],
             request_id: str | None = None) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "enable.idempotence": True})
    headers = {REQUEST_ID_KAFKA_HEADER: request_id.encode()} if request_id else {}
    for value in values:
        producer.produce(topic, value, headers=headers)
    assert producer.flush(15) == 0


@contextmanager
def _consumed(settings, topic: str, count: int, group: str = "group") -> Iterator[list]:
    """An inbox consumer of `group` storing `topic` into the payments inbox until the group has
    committed past the topic's first `count` records; yields the ids it dispatched."""
    group = f"{topic}.{group}"
    dispatched: list = []
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    consumer = InboxConsumer(build_consumer(settings, group), [topic], store,
                             dispatch=dispatched.extend)
    running = threading.Thread(target=consumer.run)
    running.start()
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                        "enable.auto.commit": False})
    try:
        wait_for(lambda: watcher.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
                 == count, timeout=30, interval=0.2, what=f"the group's commit past {count}")
    finally:
        watcher.close()
        consumer.stop()
        running.join(30)
        store.close()
    assert not running.is_alive()
    yield dispatched


def _rows(settings, topic: str) -> list[tuple]:
    """(offset, message id, parked, last error) of each inbox row of `topic`, in offset order."""
    database = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    try:
        with database.cursor() as cursor:
            cursor.execute('SELECT "offset", message_id::text, parked_at IS NOT NULL, last_error'
                           ' FROM inbox_messages WHERE topic = %s ORDER BY "offset"', (topic,))
            return cursor.fetchall()
    finally:
        database.close()


def _payment_request(**changes) -> dict:
    event = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": "someone",
                                          "amount": Decimal("1.00")})
    return event.to_json() | changes


def test_a_record_parked_as_it_arrives_is_said_in_the_log_with_its_reason(settings, topic,
                                                                          caplog):
    """A record the consumer parks as it stores it (no value, not JSON, no envelope, a payload
    that breaks its contract, a type or an envelope version this service does not know) is never
    handed to a handler and its offset is committed: an operator who learns of parked messages
    from the log, as of those a handler parks ("parked inbox message ..."), must learn of it
    there too, once, with its reason and where it sat, and the request id it came with."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdLogFilter())
    good = _payment_request()
    refused = _payment_request()
    refused["payload"]["amount"] = "1.001"
    values = [None, b"", b"\xff\xfe", b"not json", b"[1]", encode(refused),
              encode(_payment_request(type="PaymentRequestedV2")),
              encode(_payment_request(version=2)), encode(good)]
    _produce(settings, topic, values, request_id="click-of-the-test")
    with _consumed(settings, topic, len(values)) as dispatched:
        pass
    assert [str(message_id) for message_id in dispatched] == [good["message_id"]]
    rows = _rows(settings, topic)
    assert [offset for offset, *_ in rows] == list(range(len(values)))
    parked = [(message_id, error) for _, message_id, is_parked, error in rows if is_parked]
    assert len(parked) == len(values) - 1
    said = [record.getMessage() for record in caplog.records
            if record.levelno == logging.ERROR and "parked inbox message" in record.getMessage()
            and record.request_id == "click-of-the-test"]
    for message_id, error in parked:
        lines = [line for line in said if message_id in line]
        assert len(lines) == 1, (message_id, said)
        assert error in lines[0] and topic in lines[0]
    assert len(said) == len({error for _, error in parked})  # a line a reason

    # Read again (as after a crash before the commit): the rows stored before, not said again.
    caplog.clear()
    with _consumed(settings, topic, len(values), group="another-group") as dispatched:
        pass
    assert dispatched == [] and _rows(settings, topic) == rows
    assert not [record for record in caplog.records
                if "parked inbox message" in record.getMessage()]


def test_a_type_a_producer_made_up_is_listed_on_its_messages_one_line_as_written(
        settings, topic, capsys):
    """`python -m tasks.parked list` shows a parked message's type as the producer wrote it,
    which no contract bounds but in length: its control characters (a line break, a carriage
    return, a terminal's escape sequence) are shown escaped, so that each message stays on a line
    of its own and no record can forge a line of the listing, nor hide one."""
    from tasks import parked

    forged = "PaymentRequested  (unparsed)\n00000000-0000-0000-0000-000000000000\r\x1b[2K"
    message = _payment_request(type=forged)
    _produce(settings, topic, [encode(message)])
    with _consumed(settings, topic, 1):
        pass
    assert parked.main(["list", "payments", "--limit", "10000"]) == 0
    listed = capsys.readouterr().out
    assert not any(character in listed.rstrip("\n") for character in "\r\x1b")
    lines = listed.splitlines()
    [line] = [line for line in lines if line.startswith(message["message_id"])]
    assert "  (unparsed)\\x0a00000000-0000-0000-0000-000000000000\\x0d\\x1b[2K" in line
    assert not any(line.startswith("00000000-") for line in lines)


def test_a_message_under_an_id_another_types_message_took_is_parked_not_dropped_unsaid(
        settings, topic, caplog):
    """A message is stored once by its id, a repeat dropped. But one of another type under an id
    a message already took (a producer reusing ids, a replay tool's template) is no repeat: it is
    another message, which dropped would be lost unsaid, its offset committed. It is parked under
    its position with the text it came as and why, and said, whether the message whose id it took
    came in its batch or before; a true repeat is still dropped."""
    caplog.set_level(logging.INFO)
    request = _payment_request()
    failed = request | {"type": "PaymentFailed",
                        "payload": request["payload"] | {"reason": "NO_ACCOUNT"}}
    succeeded = request | {"type": "PaymentSucceeded"}
    _produce(settings, topic, [encode(request), encode(failed)])
    with _consumed(settings, topic, 2) as dispatched:
        pass
    _produce(settings, topic, [encode(succeeded), encode(request)])
    with _consumed(settings, topic, 4) as dispatched_after:
        pass
    assert [str(message_id) for message_id in dispatched] == [request["message_id"]]
    assert dispatched_after == []
    rows = _rows(settings, topic)
    assert [offset for offset, *_ in rows] == [0, 1, 2]  # the true repeat at 3 dropped
    assert rows[0][1:3] == (request["message_id"], False)
    for offset, message_id, is_parked, error in rows[1:]:
        assert is_parked and message_id != request["message_id"]
        assert request["message_id"] in error and "PaymentRequested" in error
        [line] = [record.getMessage() for record in caplog.records
                  if record.levelno == logging.ERROR and message_id in record.getMessage()]
        assert f"under message_id {request['message_id']})" in line and "not a repeat" in line


class _UnreadableCounted:
    """A consumer that counts the times its polls say a record batch could not be read (each time
    the client fetched it)."""

    def __init__(self, consumer: Consumer):
        self._consumer, self.unreadable = consumer, 0

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)

    def poll(self, timeout: float):
        message = self._consumer.poll(timeout)
        self._count([message] if message is not None else [])
        return message

    def consume(self, count: int, timeout: float) -> list:
        messages = self._consumer.consume(count, timeout)
        self._count(messages)
        return messages

    def _count(self, messages: list) -> None:
        self.unreadable += sum(message.error() is not None
                               and message.error().code() == KafkaError._BAD_COMPRESSION
                               for message in messages)


def test_a_record_batch_the_client_cannot_read_holds_its_partition_and_is_said_once(
        settings, topic, caplog):
    """A record batch the consumer's client cannot read (compressed with a codec it lacks, or
    corrupt: another client's) is never passed over, its records may be messages: the client
    fetches it again and again, and the partition waits there, nothing committed past it. That
    is said as an outage is, once as it begins (then once a minute), naming where it sits; it
    was a WARNING at every fetch, a second or so apart, for as long as the batch stayed."""
    caplog.set_level(logging.INFO)
    _produce(settings, topic, [encode(_payment_request())])
    produce_unreadable_batch(settings.kafka_bootstrap_servers, topic, records=3)  # at 1 to 3
    _produce(settings, topic, [encode(_payment_request())])
    group = f"{topic}.group"
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    client = _UnreadableCounted(build_consumer(settings, group))
    consumer = InboxConsumer(client, [topic], store, dispatch=lambda ids: None)
    running = threading.Thread(target=consumer.run)
    running.start()
    try:
        wait_for(lambda: client.unreadable >= 4, timeout=30, what="the batch fetched four times")
    finally:
        consumer.stop()
        running.join(30)
        store.close()
    assert not running.is_alive()
    assert [offset for offset, *_ in _rows(settings, topic)] == [0]
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                        "enable.auto.commit": False})
    try:
        assert watcher.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == 1
    finally:
        watcher.close()
    # (Only what is said of the batch: a fresh group's client may say other things, a commit
    # refused while its coordinator loads, say.)
    warned = [record.getMessage() for record in caplog.records
              if record.levelno >= logging.WARNING and record.name == "shared.inbox_consumer"]
    said = [line for line in warned if "cannot read" in line or "Decompression" in line]
    assert len(said) == 1, warned
    assert f"cannot read {topic} [0] at 1: " in said[0]
    assert "the partition waits there" in said[0]
