"""A read-through cache in Redis that does not serve a value older than the reader's own last
write, but for one case: a version bump that fails twice (below) leaves the old values readable
until they expire, CACHE_TTL_SECONDS at most.

Every cached value belongs to a namespace (one user's balance, one user's orders) with a version: a
random token. A write replaces the version once its transaction has committed; a read uses a
cached value only if it was stored under the current version. A reader that raced a write
therefore stores its value under the old version, where nobody will use it. Redis being down costs
only speed: reads go to the database, and nothing fails.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app
from sqlalchemy.orm import Session

from shared.db import after_commit

log = logging.getLogger(__name__)

CACHE_EXTENSION = "hseshop.cache"
# Versions outlive every value stored under them, so a lost version can never revive old values.
_VERSION_TTL_SECONDS = 7 * 24 * 3600
# A bump that fails (a blip, a connection gone silent past the 0.25 s timeout) is tried once more,
# on a new connection: redis-py drops a connection that failed.
_BUMP_TRIES = 2


class VersionedCache:
    def __init__(self, redis_url: str, ttl_seconds: int, prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._ttl = ttl_seconds
        self._prefix = prefix

    def _keys(self, namespace: str, key: str) -> tuple[str, str]:
        return (f"{self._prefix}:version:{namespace}",
                f"{self._prefix}:value:{namespace}:{key}")

    def read(self, namespace: str, key: str, load: Callable[[], Any]) -> Any:
        """The cached value, or `load()`'s (JSON-serialisable) result, stored for next time."""
        version_key, value_key = self._keys(namespace, key)
        try:
            version, cached = self._client.mget(version_key, value_key)
        except redis.RedisError as exc:
            log.warning("cache unavailable, reading %s from the database: %s", namespace, exc)
            return load()
        version = (version or b"0").decode()
        if cached is not None:
            entry = json.loads(cached)
            if entry["version"] == version:
                return entry["value"]
        value = load()
        try:
            self._client.set(value_key, json.dumps({"version": version, "value": value}),
                             ex=self._ttl)
        except redis.RedisError as exc:
            log.warning("cache unavailable, not storing %s: %s", namespace, exc)
        return value

    def invalidate(self, *namespaces: str) -> None:
        """Give `namespaces` new versions, in one round trip (one command for one namespace, the
        usual case: a plain SET costs less than a pipeline), tried twice."""
        for tries_left in reversed(range(_BUMP_TRIES)):
            try:
                self._bump(namespaces)
                return
            except redis.RedisError as exc:
                if tries_left:
                    log.warning("cache: invalidating %s failed, trying again: %s",
                                ", ".join(namespaces), exc)
                    continue
                # Values already cached expire within the TTL; said here because it is the one
                # way a reader could see something older than a write.
                log.error("cache unavailable, could not invalidate %s: %s",
                          ", ".join(namespaces), exc)

    def _bump(self, namespaces: tuple[str, ...]) -> None:
        if len(namespaces) == 1:
            self._client.set(self._keys(namespaces[0], "")[0], _new_version(),
                             ex=_VERSION_TTL_SECONDS)
            return
        pipe = self._client.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.set(self._keys(namespace, "")[0], _new_version(), ex=_VERSION_TTL_SECONDS)
        pipe.execute()


def _new_version() -> str:
    return os.urandom(8).hex()


def app_cache() -> VersionedCache:
    return current_app.extensions[CACHE_EXTENSION]


def invalidate_after_commit(session: Session, namespace: str) -> None:
    """Bump the namespace's version once the caller's transaction has committed; all the
    namespaces one transaction invalidates go to Redis in one round trip."""
    after_commit(session, _Invalidations(app_cache())).namespaces.add(namespace)


class _Invalidations:
    """What one transaction invalidates in one cache: equal to any other for the same cache, so
    each transaction registers one and adds its namespaces to it."""

    def __init__(self, cache: VersionedCache):
        self.cache = cache
        self.namespaces: set[str] = set()

    def __call__(self) -> None:
        self.cache.invalidate(*sorted(self.namespaces))

    def __eq__(self, other) -> bool:
        return isinstance(other, _Invalidations) and other.cache is self.cache

    def __hash__(self) -> int:
        return id(self.cache)
