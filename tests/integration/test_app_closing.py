"""An app closed (shared.app_closing.close_app) holds no connection open: its database engine's
pooled connections, its Redis clients' and its outbox relay's producer are closed then, not left
for the garbage collector."""

from __future__ import annotations

import gc
import logging
import threading
import uuid

import psycopg2
import pytest
import redis
import sqlalchemy as sa

import gateway_app
import orders_app
from gateway_app import auth, user_channels
from shared.app_closing import close_app
from shared.cache import CACHE_EXTENSION
from shared.db import db, driver_dsn
from shared.single_use_signatures import SINGLE_USE_SIGNATURES_EXTENSION
from tests.kafka_tools import librdkafka_threads, wait_for_librdkafka_threads
from tests.polling import wait_for


def _backends(settings, service: str) -> set[int]:
    """The server processes of the connections open to `service`'s database."""
    with psycopg2.connect(driver_dsn(settings.database_url(service))) as asking:
        with asking.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            pids = {pid for (pid,) in cursor.fetchall()}
    asking.close()
    return pids


@pytest.mark.parametrize("package", [orders_app, gateway_app], ids=["orders", "gateway"])
def test_a_closed_app_keeps_no_pooled_database_connection(settings, package):
    app = package.create_app(settings=settings)
    service = app.extensions["hseshop.service"]
    with app.app_context():
        pooled = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        db.session.rollback()  # (the connection back in the pool, where it stays)
    assert pooled in _backends(settings, service)
    close_app(app)
    wait_for(lambda: pooled not in _backends(settings, service), timeout=5,
             what="the app's pooled connection to end")


def _redis_ids(asking: redis.Redis, connections) -> set[int]:
    """The Redis CLIENT IDs of `connections` (redis-py's, connected), found in CLIENT LIST by
    their local addresses."""
    addresses = {"%s:%d" % connection._sock.getsockname()[:2] for connection in connections}
    return {int(client["id"]) for client in asking.client_list() if client["addr"] in addresses}


def _pooled(client: redis.Redis) -> list:
    pool = client.connection_pool
    return [*pool._available_connections, *pool._in_use_connections]


def _open_ids(asking: redis.Redis) -> set[int]:
    return {int(client["id"]) for client in asking.client_list()}


@pytest.mark.parametrize("package", [orders_app, gateway_app], ids=["orders", "gateway"])
def test_a_closed_app_keeps_no_redis_connection(settings, package):
    """Each of its Redis clients connected, as serving would: the cache read (every service), the
    used signatures noted (a service behind the gateway), the rate limiter asked, a notification
    published and a socket's channel listened to (the gateway); none left open once it is
    closed."""
    app = package.create_app(settings=settings)
    asking = redis.Redis.from_url(settings.redis_url)
    try:
        cache = app.extensions[CACHE_EXTENSION]
        cache.read("closing-test", uuid.uuid4().hex, lambda: 1)
        clients = {"cache": _pooled(cache._client)}
        if package is orders_app:
            signatures = app.extensions[SINGLE_USE_SIGNATURES_EXTENSION]
            assert signatures.first_use(uuid.uuid4().hex)
            clients["signatures"] = _pooled(signatures._client)
        else:
            limiter = app.extensions[auth.RATE_LIMITER]
            limiter.check(f"closing-test-{uuid.uuid4().hex}")
            publisher = app.extensions[user_channels.REDIS_EXTENSION]
            publisher.ping()
            listener = app.extensions[user_channels.LISTENER_EXTENSION]
            with listener.listening(f"closing-test-{uuid.uuid4().hex}", subscribe_timeout=5):
                clients.update(limiter=_pooled(limiter._client), publisher=_pooled(publisher),
                               subscriber=[listener._pubsub.connection])
        ids = {name: _redis_ids(asking, connections) for name, connections in clients.items()}
        assert all(ids.values()), f"each client connected: {ids}"
        close_app(app)
        wait_for(lambda: not set().union(*ids.values()) & _open_ids(asking), timeout=5,
                 what=f"the app's Redis connections to end: {ids}")
    finally:
        asking.close()


def test_a_closed_gateway_ends_its_notification_listener_without_a_word(settings, caplog):
    """Its thread ends, and says no Redis was lost (nor tells a socket so): it is the app that
    closed the connection under it."""
    app = gateway_app.create_app(settings=settings)
    listener = app.extensions[user_channels.LISTENER_EXTENSION]
    before = set(threading.enumerate())
    with listener.listening(f"closing-test-{uuid.uuid4().hex}", subscribe_timeout=5):
        pass  # (its thread stays, its connection quiet, until PING_WHEN_QUIET_SECONDS)
    [reading] = [thread for thread in threading.enumerate()
                 if thread not in before and thread.name == "notification-listener"]
    with caplog.at_level(logging.WARNING, logger="gateway_app.channel_listener"):
        close_app(app)
        reading.join(timeout=5)
    assert not reading.is_alive()
    assert [record.getMessage() for record in caplog.records
            if record.name == "gateway_app.channel_listener"] == []


def test_a_closed_app_keeps_no_outbox_producer(settings):
    """The relay's publisher in a service's app (tasks.relay, made as it leads there) is closed
    with the app: its producer destroyed, its threads ended, though the app itself lives on."""
    from tasks import relay

    app = orders_app.create_app(settings=settings)
    gc.collect()  # (clients of earlier tests let go)
    threads_before = librdkafka_threads()
    with app.app_context():
        assert relay._publisher("orders").send_batch([]) == {}  # (its producer made)
    assert librdkafka_threads() > threads_before
    close_app(app)
    wait_for_librdkafka_threads(threads_before)
