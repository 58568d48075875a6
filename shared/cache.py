"""A read-through cache in Redis that does not serve a value older than the reader's own last
write, but for two cases: a version bump Redis took and lost (a failover), and one kept for later
(below) by a process that ends before Redis answers again, leave the old values readable until they
expire, CACHE_TTL_SECONDS at most.

Every cached value belongs to a namespace (one user's balance, one user's orders) with a version: a
random token, made by the first read that finds none (SET NX: of readers racing, all take the one
that won). A write bumps the version once its transaction has committed, or once its COMMIT failed
(its answer lost with the connection: the write may be kept, and the retry that finds it done bumps
nothing): it sets a new token, or, where Redis refuses that for want of memory (a full Redis under
noeviction: "OOM command not allowed", redis-py's OutOfMemoryError), deletes the version, which such
a Redis still takes. A read uses a cached value only if it was stored under the current version,
and stores what it loads under the version it found before loading. A token is never made twice,
and a namespace with no version serves nothing: so a value stored under a version was loaded after
that version was made, after every write whose bump came before it. Each interleaving of a read
with a write's bump:
- the bump before the read's MGET: the read finds the new token (or none, and makes one), and loads
  after the write;
- between the MGET, finding none, and the SET NX: the SET NX loses to the bump's token, which the
  read takes (the GET in the same MULTI), and it loads after the write;
- after the version was found (or made), before the value is stored: the value goes under a
  version gone, where nobody will use it (a miss, the next read's).
A version that expires, or that Redis evicts, is a missing one, and brings no old value back (one
read as "0" did: the value stored under it before the namespace's first write). A full Redis under
noeviction still takes the bump (one made of a SET alone was refused, and every process but the
writer's went on serving the values from before the write); readers, unable to make a version,
read the database until it has room. Redis being down costs only speed: reads go to the
database, and nothing fails.

A bump sets a token rather than always deleting the version for a rolling deploy from the release
before, whose processes read a missing version as "0" and make none: after a bump that deleted,
such a process read "0", stored what it loaded under it, and after the next write (a deletion of
nothing) read "0" again and served that value, from before the write, until it expired. A bump
that sets leaves a version in place, under which that value was not stored. Such a process still
serves, until it expires, a value it stored under "0" while the version is missing: evicted, or
deleted by a bump into a full Redis (where its own release's bump, a SET, was refused, and every
process but the writer's served the old values alike).

A bump that could not be made, tried twice (Redis restarting, one that keeps its keys as
`--appendonly yes` has it, or cut off from the writer), is not given up: the writer's process
keeps its namespaces, reads them from the database meanwhile, and tries again every
UNBUMPED_RETRY_SECONDS on a thread of its own. Given up, the value cached before the write came
back with Redis and was served, to the writer too, until it expired. The other processes serve
the values from before the write as long as they reach Redis and the writer's process does not:
for the whole of a partition that cuts off the writer alone (until those values expire), and,
once the writer's process reaches Redis again, for the time its next try takes to be made: up to
UNBUMPED_RETRY_SECONDS when Redis refused connections meanwhile, and about 0.45 s or more when
packets were dropped (a try under way as Redis comes back waits out the client's 0.25 s timeout,
then the pause before the next).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import redis
from flask import current_app
from sqlalchemy.orm import Session

from shared.db import collected_after_commit

log = logging.getLogger(__name__)

CACHE_EXTENSION = "hseshop.cache"
# The format of what the cache keeps: its entries' (`{"version", "value"}`) and the shape of every
# answer cached (orders_app's OrderSchema and OrderPageSchema, payments_app's AccountSchema). Raise
# it with any change to them: it names the values' keys, so that in a rolling deploy the releases
# on either side of the change do not serve each other's answers (each reads its own, until they
# expire), while a write's bump still reaches both (the namespace's version is one key for all).
# tests/unit/test_cache_format.py fails when what is stored for a sample of each answer changes
# (a field, Amount's or a time's format, next_cursor's encoding, the entry's shape) and it does not.
CACHE_FORMAT = 1
# How long a version outlives the values stored under it (CACHE_TTL_SECONDS): only so that the
# versions of namespaces no longer read go. One expired is a missing one, which serves nothing (the
# next read makes another), so any length is safe; a long one spares a miss.
_VERSION_TTL_SECONDS = 7 * 24 * 3600
# An invalidation that fails (a blip, a connection gone silent past the 0.25 s timeout) is tried
# once more, on a new connection: redis-py drops a connection that failed.
_BUMP_TRIES = 2
# How often a process tries again the bumps it could not make (VersionedCache._unbumped), while it
# has any (the module's docstring says how long another process may serve a value from before them).
UNBUMPED_RETRY_SECONDS = 0.2
# How often, while it keeps namespaces, the process says that their reads go to the database.
UNBUMPED_WARNING_SECONDS = 60.0
# How many of the namespaces a log line names (a process may keep hundreds of thousands).
_NAMED_IN_A_LOG_LINE = 5


class VersionedCache:
    FORMAT = CACHE_FORMAT

    def __init__(self, redis_url: str, ttl_seconds: int, prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._ttl = ttl_seconds
        self._version_ttl = ttl_seconds + _VERSION_TTL_SECONDS
        self._prefix = prefix
        self._start_without_unbumped()
        _forgotten_in_forked_children(self)

    def _start_without_unbumped(self) -> None:
        # The namespaces whose bump failed, to be made once Redis answers (_retry_the_unbumped),
        # each with how many times it was kept.
        self._unbumped: dict[str, int] = {}
        self._unbumped_lock = threading.Lock()
        self._retrying: threading.Thread | None = None
        self._closed = threading.Event()

    def _after_fork_in_child(self) -> None:
        """A forked child starts with no namespace kept, a lock of its own (the parent's may have
        been held as it forked, by a thread the child does not have) and no retrying thread: the
        parent's process, whose writes they were, goes on making those bumps."""
        self._start_without_unbumped()

    def close(self) -> None:
        """Stop trying again the bumps kept (they are given up) and close the connections."""
        self._closed.set()
        retrying = self._retrying
        if retrying is not None:
            retrying.join()
        self._client.close()

    def _keys(self, namespace: str, key: str) -> tuple[str, str]:
        return (f"{self._prefix}:version:{namespace}",
                f"{self._prefix}:value:f{self.FORMAT}:{namespace}:{key}")

    def read(self, namespace: str, key: str, load: Callable[[], Any]) -> Any:
        """The cached value, or `load()`'s (JSON-serialisable) result, stored for next time."""
        version_key, value_key = self._keys(namespace, key)
        if namespace in self._unbumped:  # (its cached values may be older than a write)
            return load()
        try:
            version, cached = self._client.mget(version_key, value_key)
            if version is None:  # (never made, expired, evicted, or deleted by a bump)
                version = self._made_version(version_key)
        except redis.RedisError as exc:  # (down, or full: no version could be made)
            log.warning("cache unavailable, reading %s from the database: %s", namespace, exc)
            return load()
        version = version.decode()
        stored = _value_stored_under(version, cached)
        if stored is not _NOT_STORED:
            return stored
        value = load()  # (stored over whatever entry was kept, one unreadable too)
        try:
            self._client.set(value_key, cache_entry(version, value), ex=self._ttl)
        except redis.RedisError as exc:
            log.warning("cache unavailable, not storing %s: %s", namespace, exc)
        return value

    def _made_version(self, version_key: str) -> bytes:
        """A new version, or the one a racing reader made first (MULTI: one round trip)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(version_key, _new_version(), nx=True, ex=self._version_ttl)
        pipe.get(version_key)
        _made, version = pipe.execute()
        if version is None:  # (evicted as soon as made: a Redis with no room to spare)
            raise redis.RedisError("no version could be kept")
        return version

    def invalidate(self, *namespaces: str) -> None:
        """Bump the versions of `namespaces` (_bump), tried twice."""
        for tries_left in reversed(range(_BUMP_TRIES)):
            try:
                self._bump(namespaces)
                return
            except redis.RedisError as exc:
                if tries_left:
                    log.warning("cache: invalidating %s failed, trying again: %s",
                                ", ".join(namespaces), exc)
                    continue
                log.error("cache unavailable, could not invalidate %s (to be done once it"
                          " answers): %s", ", ".join(namespaces), exc)
                self._keep_unbumped(namespaces)

    def _keep_unbumped(self, namespaces: tuple[str, ...]) -> None:
        """Keep `namespaces` to be bumped once Redis answers, tried again on a thread of this
        process's (a forked child forgets them: _after_fork_in_child)."""
        with self._unbumped_lock:
            for namespace in namespaces:
                self._unbumped[namespace] = self._unbumped.get(namespace, 0) + 1
            if (self._retrying is None or not self._retrying.is_alive()) and \
                    not self._closed.is_set():
                self._retrying = threading.Thread(target=self._retry_the_unbumped,
                                                  name="cache-unbumped", daemon=True)
                self._retrying.start()

    def _retry_the_unbumped(self) -> None:
        """Until none is left (or the cache is closed), bump the namespaces kept (not under the
        lock: a write failing its own bump meanwhile does not wait for Redis twice); each is
        forgotten unless a write kept it again while it was bumped, which that bump may have come
        before. Now and then, while some are kept, say that their reads go to the database."""
        warned = time.monotonic()
        while not self._closed.wait(UNBUMPED_RETRY_SECONDS):
            with self._unbumped_lock:
                kept = dict(self._unbumped)
                if not kept:
                    self._retrying = None
                    return
            try:
                self._bump(tuple(sorted(kept)))
            except redis.RedisError as exc:
                if time.monotonic() - warned >= UNBUMPED_WARNING_SECONDS:
                    warned = time.monotonic()
                    log.warning("cache still unavailable, reading %s from the database until"
                                " their invalidation is made: %s", _some(kept), exc)
                continue
            with self._unbumped_lock:
                for namespace, times in kept.items():
                    if self._unbumped.get(namespace) == times:
                        del self._unbumped[namespace]
            log.warning("cache: invalidated %s once it answered again", _some(kept))

    def _bump(self, namespaces: tuple[str, ...]) -> None:
        """Give `namespaces` new versions, in one round trip (one command for one namespace, the
        usual case: a plain SET costs less than a pipeline); where Redis refuses them for want of
        memory, delete their versions instead, in one more (the module's docstring says why not
        always a deletion)."""
        version_keys = [self._keys(namespace, "")[0] for namespace in namespaces]
        try:
            if len(version_keys) == 1:
                self._client.set(version_keys[0], _new_version(), ex=self._version_ttl)
                return
            pipe = self._client.pipeline(transaction=False)
            for version_key in version_keys:
                pipe.set(version_key, _new_version(), ex=self._version_ttl)
            pipe.execute()
        except redis.exceptions.OutOfMemoryError:  # (some may be set: deleted alike)
            self._client.delete(*version_keys)


def cache_entry(version: str, value: Any) -> str:
    """What the cache stores for `value` under `version` (of the format CACHE_FORMAT names)."""
    return json.dumps({"version": version, "value": value})


_NOT_STORED = object()


def _value_stored_under(version: str, entry: bytes | None) -> Any:
    """The value `entry` holds if it was stored under `version`, else _NOT_STORED: for no entry,
    one stored under another version, and one unreadable or of another shape (corrupted, or
    written otherwise by another release), which a read took for a 500."""
    if entry is None:
        return _NOT_STORED
    try:
        stored = json.loads(entry)
    except (ValueError, RecursionError):  # (not JSON, not UTF-8, or nested past Python's limit)
        return _NOT_STORED
    if isinstance(stored, dict) and stored.keys() == {"version", "value"} \
            and stored["version"] == version:
        return stored["value"]
    return _NOT_STORED


def _new_version() -> str:
    return os.urandom(8).hex()


def _some(namespaces: Iterable[str]) -> str:
    """How many namespaces, and a few of them, for a log line."""
    names = sorted(namespaces)
    named = ", ".join(names[:_NAMED_IN_A_LOG_LINE])
    more = len(names) - _NAMED_IN_A_LOG_LINE
    return f"{len(names)} namespace(s) ({named}{f' and {more} more' if more > 0 else ''})"


# The caches of the process, each told when the process forks (os.register_at_fork), in the child.
_CACHES: weakref.WeakSet[VersionedCache] = weakref.WeakSet()
_CACHES_LOCK = threading.Lock()
_fork_hook_registered = False


def _forgotten_in_forked_children(cache: VersionedCache) -> None:
    """Have `cache` start afresh in a forked child (VersionedCache._after_fork_in_child); the
    hook is registered as the first cache is made, not as the module is imported."""
    global _fork_hook_registered
    with _CACHES_LOCK:
        _CACHES.add(cache)
        if not _fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook_registered = True


def _after_fork_in_child() -> None:
    global _CACHES_LOCK
    _CACHES_LOCK = threading.Lock()  # (the parent's may have been held as it forked)
    for cache in list(_CACHES):
        cache._after_fork_in_child()


def app_cache() -> VersionedCache:
    return current_app.extensions[CACHE_EXTENSION]


def invalidate_after_commit(session: Session, namespace: str) -> None:
    """Bump the namespace's version once the caller's transaction has committed, or its COMMIT
    failed (its answer lost with the connection: committed or not, a bump costs at most a miss);
    all the namespaces one transaction invalidates go to Redis in one round trip."""
    cache = app_cache()
    collected_after_commit(session, (_Invalidations, cache), lambda: _Invalidations(cache),
                           also_if_unanswered=True).namespaces.add(namespace)


class _Invalidations:
    """What one transaction invalidates in one cache (one per transaction and cache:
    shared.db.collected_after_commit)."""

    def __init__(self, cache: VersionedCache):
        self.cache = cache
        self.namespaces: set[str] = set()

    def __call__(self) -> None:
        self.cache.invalidate(*sorted(self.namespaces))

    def __repr__(self) -> str:  # (for the log line of one that failed: shared.db)
        return f"the cache invalidation of {_some(self.namespaces)}"
