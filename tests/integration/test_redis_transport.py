"""The Celery broker transport (tasks/redis_transport.py) against the real Redis: one command
client per channel, a new one once the channel's pool is replaced, and messages that still go
through."""

from __future__ import annotations

import copy
import pickle
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from redis import Redis

import celeryconfig
from devstack.infra import fallback_redis_server
from shared.config import load_settings
from shared.task_queues import QUEUES_UNREACHABLE
from tasks.celery_app import app
from tasks.inbox import handle_inbox_batch
from tasks.redis_transport import Transport
from tests.celery_tools import sending_to
from tests.network_tools import NeverReadingServer, SilencingProxy
from tests.polling import wait_for
from tests.process_tools import start_child


def test_celery_publishes_through_the_shops_transport():
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)


def test_a_connection_copied_keeps_the_shops_transport_though_its_url_says_redis():
    """Its URL names the transport `redis`, for Flower; a copy is rebuilt from that info, and
    would have come back on kombu's own Redis transport."""
    with app.connection_for_write() as connection:
        assert connection.as_uri().startswith("redis://")
        for copied in (copy.deepcopy(connection), pickle.loads(pickle.dumps(connection))):
            assert isinstance(copied.transport, Transport)


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


def test_a_task_sent_to_a_redis_gone_silent_is_sent_again_on_a_new_connection(settings):
    """A publish waits for Redis's reply: on a connection gone silent (a failover, a NAT that
    forgot it) that wait ends after the socket timeout, and Celery sends the task again on a new
    connection, instead of waiting for ever (as the inbox consumer's dispatch once could)."""
    broker = urlsplit(settings.celery_broker_url)
    proxy = SilencingProxy(f"{broker.hostname}:{broker.port or 6379}")
    sender = Celery("silence-test", config_source="celeryconfig")
    # (broker_url gives way to the environment's CELERY_BROKER_URL, broker_write_url does not)
    sender.conf.broker_write_url = broker._replace(netloc=proxy.address).geturl()
    queue = f"silence-test-{uuid.uuid4().hex}"
    try:
        sender.send_task("hseshop.silence_test", args=("first",), queue=queue)
        assert proxy.connections_carried() >= 1
        proxy.silence()
        sent = threading.Thread(target=sender.send_task, args=("hseshop.silence_test",),
                                kwargs={"args": ("second",), "queue": queue}, daemon=True)
        sent.start()
        sent.join(timeout=30)
        assert not sent.is_alive(), "the task sent over the silent connection is still waiting"
        with app.pool.acquire(block=True) as connection:
            channel = connection.default_channel
            assert channel.queue_declare(queue=queue).message_count == 2
            channel.queue_purge(queue)
    finally:
        proxy.close()
        sender.close()


def test_a_publish_to_a_redis_that_takes_connections_and_never_answers_gives_up_after_two_waits(
        settings):
    """Redis hung (or a host gone behind a proxy that still accepts): the connection a publish
    had goes silent, and every new one is taken and never answered. The publish waits for the
    reply on the connection it had, then for the PING of one new connection, and fails (a
    dispatch's messages left to the sweeper): two socket timeouts, 10 s. Kombu's retry policy,
    meant for refusals, went on to connect 3 times more, each waiting as long: 25.6 s measured,
    holding the inbox consumer's loop. A publish after it, its pooled connection gone, waits for
    one new connection's. (Deadlines twice those bounds: not a measure of speed.)"""
    reply_wait = celeryconfig.broker_transport_options["socket_timeout"]
    broker = urlsplit(settings.celery_broker_url)
    proxy = SilencingProxy(f"{broker.hostname}:{broker.port or 6379}")
    hung = NeverReadingServer()
    queue = f"silence-test-{uuid.uuid4().hex}"

    def send() -> None:
        handle_inbox_batch.apply_async(("payments", []), queue=queue)

    try:
        with sending_to(app, broker._replace(netloc=proxy.address).geturl()):
            send()  # (a connection pooled, Redis answering)
            proxy.silence()
            proxy.send_to(hung.url.removeprefix("http://"))
            connections = proxy.connections_carried()
            assert _seconds_to_fail(send) < 2 * (2 * reply_wait)
            assert proxy.connections_carried() == connections + 1  # one new connection tried
            assert _seconds_to_fail(send) < 2 * reply_wait
    finally:
        proxy.close()
        hung.close()
        with app.pool.acquire(block=True) as connection:
            connection.default_channel.queue_delete(queue)


def _seconds_to_fail(call) -> float:
    began = time.monotonic()
    with pytest.raises(QUEUES_UNREACHABLE):
        call()
    return time.monotonic() - began


def test_the_shops_broker_connection_reaches_a_redis_on_a_unix_socket(tmp_path):
    """CELERY_BROKER_URL=redis+socket:///path, kombu's form for a socket, is taken and the app's
    connection carries messages through it (c5fbb12 had refused it at every process's start);
    unix:///path, which kombu read as 127.0.0.1 and a database named by the path, a worker
    failing in a traceback as it connected, is refused as the settings are read."""
    socket_path = tmp_path / "redis.sock"
    redis_server = start_child(
        [fallback_redis_server(), "--port", "0", "--unixsocket", str(socket_path), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket_path.exists() or redis_server.poll() is not None, timeout=30,
                 what="redis-server to listen on its socket")
        assert redis_server.poll() is None, f"redis-server exited ({redis_server.returncode})"
        broker_url = load_settings({"CELERY_BROKER_URL": f"redis+socket://{socket_path}"}
                                   ).celery_broker_url
        with app.connection_for_write(broker_url) as connection:
            queue = connection.SimpleQueue(f"socket-test-{uuid.uuid4().hex}")
            queue.put({"through": "the socket"})
            message = queue.get(timeout=10)
            assert message.payload == {"through": "the socket"}
            message.ack()
            queue.close()
        assert Redis(unix_socket_path=str(socket_path)).keys("socket-test-*") == []  # (read)
        with pytest.raises(ValueError, match="redis\\+socket:///path"):
            load_settings({"CELERY_BROKER_URL": f"unix://{socket_path}"})
    finally:
        redis_server.kill()
        redis_server.wait(timeout=30)
