"""The Celery broker transport (tasks/redis_transport.py) against the real Redis: one command
client per channel, a new one once the channel's pool is replaced, and messages that still go
through."""

from __future__ import annotations

import uuid

from kombu import Connection, Exchange, Queue

from tasks.celery_app import app
from tasks.redis_transport import Transport


def test_celery_publishes_through_the_shops_transport():
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)


def test_a_channel_keeps_its_command_client_until_its_pool_is_replaced(settings):
    with Connection(settings.celery_broker_url, transport=Transport) as connection:
        channel = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first

        channel._disconnect_pools()  # what kombu does when the connection to Redis breaks
        replacement = channel._create_client()
        assert replacement is not first and replacement.connection_pool is channel.pool
        assert replacement.ping()


def test_messages_published_through_one_client_are_all_delivered(settings):
    queue = Queue(f"transport-test-{uuid.uuid4().hex}", Exchange("transport-test"),
                  routing_key="transport-test")
    with Connection(settings.celery_broker_url, transport=Transport) as connection:
        producer = connection.Producer()
        for number in range(3):
            producer.publish({"n": number}, exchange=queue.exchange, routing_key="transport-test",
                             declare=[queue])
        bound = queue(connection.default_channel)
        received = []
        while (message := bound.get(no_ack=True)) is not None:
            received.append(message.payload["n"])
        bound.delete()
    assert received == [0, 1, 2]
