"""Reads served from Redis never go stale after a write, and Redis being down breaks nothing."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from urllib.parse import urlsplit

import pytest

import orders_app
import payments_app
from devstack.infra import free_port
from orders_app import service as orders
from payments_app import service as payments
from shared.cache import CACHE_EXTENSION, VersionedCache, invalidate_after_commit
from shared.db import transaction
from tests.network_tools import SilencingProxy
from tests.polling import wait_for


@pytest.fixture
def cache(settings):
    return VersionedCache(settings.redis_url, 60, prefix=f"test-{uuid.uuid4().hex[:6]}")


def test_a_transaction_bumps_every_namespace_it_invalidated_once_it_commits(
        payments_flask_app, cache, monkeypatch):
    monkeypatch.setitem(payments_flask_app.extensions, CACHE_EXTENSION, cache)
    for name in ("a", "b", "c"):
        cache.read(name, "k", lambda: "before")
    with payments_flask_app.app_context():
        with pytest.raises(RuntimeError):
            with transaction() as session:
                invalidate_after_commit(session, "a")
                raise RuntimeError("rolled back: nothing to invalidate")
        assert cache.read("a", "k", lambda: "bumped") == "before"
        with transaction() as session:
            for name in ("a", "b", "a"):
                invalidate_after_commit(session, name)
            assert cache.read("a", "k", lambda: "now") == "before"  # not before the commit
    assert [cache.read(name, "k", lambda: "after") for name in ("a", "b", "c")] == [
        "after", "after", "before"]


def test_a_version_bump_on_a_connection_gone_silent_is_made_again_on_a_new_one(settings):
    """A bump that fails (here its connection has gone silent past the client's 0.25 s timeout)
    is tried again: given up, the writer's own next read would serve the value from before."""
    url = urlsplit(settings.redis_url)
    proxy = SilencingProxy(f"{url.hostname}:{url.port or 6379}")
    try:
        cache = VersionedCache(url._replace(netloc=proxy.address).geturl(), 60,
                               prefix=f"test-{uuid.uuid4().hex[:6]}")
        assert cache.read("user", "balance", lambda: "before") == "before"
        proxy.silence()
        cache.invalidate("user")
        assert cache.read("user", "balance", lambda: "after") == "after"
    finally:
        proxy.close()


@contextmanager
def _redis_through_a_proxy(settings) -> Iterator[tuple[str, SilencingProxy]]:
    """The session's Redis URL, but through a proxy the test can cut."""
    url = urlsplit(settings.redis_url)
    proxy = SilencingProxy(f"{url.hostname}:{url.port or 6379}")
    try:
        yield url._replace(netloc=proxy.address).geturl(), proxy
    finally:
        proxy.close()


def test_a_write_whose_bump_found_redis_gone_is_not_read_stale_once_redis_is_back(
        settings, user_id):
    """Redis restarted (compose's keeps its keys: --appendonly yes) or cut off from the writer as
    a top-up commits: both tries of its bump fail. Once Redis answers again, the balance cached
    before is the writer's no more (it was, until it expired, when the bump was given up)."""
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        client = payments_app.create_app(
            settings=dataclasses.replace(settings, redis_url=redis_url)).test_client()
        client.post("/accounts", signed_as=user_id)
        client.post("/accounts/deposit", json={"amount": 10}, signed_as=user_id)
        assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
            "10.00"  # (cached)
        redis.cut()
        topped_up = client.post("/accounts/deposit", json={"amount": 5}, signed_as=user_id)
        assert topped_up.get_json()["balance"] == "15.00"
        redis.restore()
        assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
            "15.00"


def test_a_bump_that_found_redis_gone_is_made_once_it_answers_for_every_process(settings):
    """Another process (another cache, its own connections) is served the value from before the
    write only until the writer's process makes the bump it kept: at once as Redis answers."""
    prefix = f"test-{uuid.uuid4().hex[:6]}"
    reader = VersionedCache(settings.redis_url, 60, prefix=prefix)
    assert reader.read("user", "balance", lambda: "before") == "before"
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        writer = VersionedCache(redis_url, 60, prefix=prefix)
        redis.cut()
        writer.invalidate("user")  # (both tries refused)
        assert writer.read("user", "balance", lambda: "after") == "after"  # (from the database)
        redis.restore()
        wait_for(lambda: reader.read("user", "balance", lambda: "after") == "after",
                 timeout=2, what="the bump kept for later made")
        wait_for(lambda: writer.read("user", "balance", lambda: None) == "after", timeout=2,
                 what="the writer reading from the cache again")


def test_a_value_read_before_a_write_and_stored_after_it_is_never_served(cache):
    loads = iter(["old", "new"])
    # The reader reads the version, then the database ("old")...
    stale_reader_value = cache.read("ns", "k", lambda: (cache.invalidate("ns"), next(loads))[1])
    # ...while the write commits and bumps the version before the reader stores "old".
    assert stale_reader_value == "old"
    assert cache.read("ns", "k", lambda: next(loads)) == "new"
    assert cache.read("ns", "k", lambda: pytest.fail("should be cached now")) == "new"


def test_each_payment_write_path_invalidates_the_cached_balance(
        payments_flask_app, user_id):
    client = payments_flask_app.test_client()
    client.post("/accounts", signed_as=user_id)
    client.post("/accounts/deposit", json={"amount": 50}, signed_as=user_id)
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "50.00"
    client.post("/accounts/deposit", json={"amount": 5}, signed_as=user_id)
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "55.00"
    with payments_flask_app.app_context():
        with transaction() as session:
            payments.take_payments(session, [payments.PaymentRequest(
                order_id=uuid.uuid4(), user_id=user_id, amount=Decimal("15"))])
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "40.00"


def test_placing_and_settling_orders_invalidate_the_cached_orders(orders_flask_app, user_id):
    client = orders_flask_app.test_client()
    assert client.get("/orders", signed_as=user_id).get_json()["items"] == []
    order = client.post("/orders", json={"amount": 3}, signed_as=user_id).get_json()
    assert [o["id"] for o in client.get("/orders", signed_as=user_id).get_json()["items"]] == \
        [order["id"]]
    assert client.get(f"/orders/{order['id']}", signed_as=user_id).get_json()["status"] == "NEW"
    with orders_flask_app.app_context():
        with transaction() as session:
            orders.apply_payment_results(session, [orders.PaymentResult(
                order_id=uuid.UUID(order["id"]), user_id=user_id, succeeded=False,
                reason="NO_ACCOUNT")])
    settled = client.get(f"/orders/{order['id']}", signed_as=user_id).get_json()
    assert (settled["status"], settled["reason"]) == ("CANCELLED", "NO_ACCOUNT")
    listed = client.get("/orders", signed_as=user_id).get_json()["items"]
    assert listed[0]["status"] == "CANCELLED"


def test_with_redis_down_reads_and_writes_still_work(settings, user_id):
    no_redis = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    pay = payments_app.create_app(settings=no_redis)
    shop = orders_app.create_app(settings=no_redis)
    pay_client, shop_client = pay.test_client(), shop.test_client()
    assert pay_client.post("/accounts", signed_as=user_id).status_code == 201
    assert pay_client.post("/accounts/deposit", json={"amount": 9},
                           signed_as=user_id).status_code == 200
    assert pay_client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "9.00"
    order = shop_client.post("/orders", json={"amount": 1}, signed_as=user_id)
    assert order.status_code == 202
    assert shop_client.get(f"/orders/{order.get_json()['id']}",
                           signed_as=user_id).status_code == 200
    assert shop_client.get("/health").status_code == 503  # and it says so
