"""A failure counted before its outcome is known (RateLimiter.failure_reserved), on real Redis: kept
when confirmed, given back otherwise, in the window it was counted in."""

from __future__ import annotations

import types
import uuid

import pytest
import redis

from devstack.infra import forget_redis_keys, free_port
from gateway_app import ratelimit
from gateway_app.ratelimit import RateLimited, RateLimiter
from tests.environment import REDIS_DB, REDIS_KEYS_OF_THE_RUN

SUBJECT = "failed-sign-in:someone"


@pytest.fixture
def redis_url(infrastructure):
    return f"{infrastructure.redis_base}/{REDIS_DB['integration']}"


@pytest.fixture
def key_prefix(redis_url):
    """A key prefix of the test's own, its keys deleted after it."""
    prefix = f"{REDIS_KEYS_OF_THE_RUN}integration.ratelimit-{uuid.uuid4().hex[:8]}"
    yield prefix
    forget_redis_keys(redis_url, prefix)


@pytest.fixture
def limiter(redis_url, key_prefix):
    return RateLimiter(redis_url, 100, key_prefix)


def _counts(redis_url: str, key_prefix: str) -> list[int]:
    """The subject's count in each window it has one, in order: read from Redis whatever window
    it is now, so a test straddling two windows reads both."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(client.scan_iter(match=f"{key_prefix}:ratelimit:{SUBJECT}:*"),
                      key=lambda key: int(key.rsplit(b":", 1)[1]))  # (by window number)
        return [int(client.get(key)) for key in keys]
    finally:
        client.close()


def test_a_reserved_failure_not_confirmed_is_given_back(limiter, redis_url, key_prefix):
    with limiter.failure_reserved(SUBJECT, limit=3):
        assert _counts(redis_url, key_prefix) == [1]  # counted as the attempt begins
    assert _counts(redis_url, key_prefix) == [0]


def test_a_reserved_failure_confirmed_is_kept(limiter, redis_url, key_prefix):
    with limiter.failure_reserved(SUBJECT, limit=3) as failure:
        failure.confirm()
    assert _counts(redis_url, key_prefix) == [1]


def test_a_reserved_failure_whose_block_raised_is_given_back_and_the_error_goes_on(
        limiter, redis_url, key_prefix):
    with pytest.raises(ConnectionError), limiter.failure_reserved(SUBJECT, limit=3):
        raise ConnectionError("the database went away")
    assert _counts(redis_url, key_prefix) == [0]


def test_past_the_limit_the_block_is_not_run(limiter, redis_url, key_prefix):
    for _ in range(2):
        with limiter.failure_reserved(SUBJECT, limit=2) as failure:
            failure.confirm()
    ran = []
    with pytest.raises(RateLimited), limiter.failure_reserved(SUBJECT, limit=2):
        ran.append(True)
    assert ran == []


def test_a_reserved_failure_is_given_back_in_the_window_it_was_counted_in(
        limiter, redis_url, key_prefix, monkeypatch):
    """An attempt that began in one window and ends in the next takes its count back from the
    first: taken from the second, the first would keep it and the second go below nothing."""
    now = [10 * ratelimit.WINDOW_SECONDS - 0.5]
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: now[0]))
    with limiter.failure_reserved(SUBJECT, limit=3):
        now[0] += 1
    assert _counts(redis_url, key_prefix) == [0]


def test_asking_whether_a_subject_has_spent_its_limit_counts_nothing(limiter, redis_url,
                                                                     key_prefix):
    """wait_when_spent: the wait to the window's end once `limit` are counted, None before, and
    nothing counted by asking; with Redis away, None (it lets everyone through)."""
    now = 10 * ratelimit.WINDOW_SECONDS + 15
    assert limiter.wait_when_spent(SUBJECT, limit=2, now=now) is None
    limiter.check(SUBJECT, now=now, limit=2)
    assert limiter.wait_when_spent(SUBJECT, limit=2, now=now) is None
    limiter.check(SUBJECT, now=now, limit=2)
    assert limiter.wait_when_spent(SUBJECT, limit=2, now=now) == ratelimit.WINDOW_SECONDS - 15
    # A limit of none (the next window, nothing counted in it): spent all the same.
    assert limiter.wait_when_spent(SUBJECT, limit=0, now=now + ratelimit.WINDOW_SECONDS) == \
        ratelimit.WINDOW_SECONDS - 15
    assert _counts(redis_url, key_prefix) == [2]
    away = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", 100, key_prefix)
    assert away.wait_when_spent(SUBJECT, limit=0) is None
