"""What bench runs that are gone left on the PostgreSQL and Redis the machine shares, and the mark
by which a run still going is told from them.

A bench run on the machine's servers names its databases hseshop_bench_<RUN_ID>_<service> and its
Redis keys bench.<RUN_ID>..., and forgets them as it stops (bench.shop.forget_stack_data); one
killed outright (SIGKILL, the OOM killer) leaves them for good. So each run holds, for as long as
it goes on, a PostgreSQL advisory lock of its own (LOCK_CLASS, its RUN_ID) on a connection of its
own: the server lets go of it however the run ends, its connection closed with its process. A run
is live while its lock is held, or while anything is connected to one of its databases (a run of
a checkout older than the lock holds none, and its processes keep connections open all the
while; so do processes a killed run left, which the next run in their folder stops: their data
goes with the run after that). A run starting sweeps away the databases and keys of every run not
live, having taken its own lock first: a run starting beside it takes its lock before it makes
anything, and so is never swept.
"""

from __future__ import annotations

import re

import psycopg2

from devstack.infra import forget_redis_keys

# The first key of every bench run's lock ("bnch"); the second is its RUN_ID's 32 bits.
LOCK_CLASS = 0x626E6368
DATABASE_PREFIX = "hseshop_bench_"
KEY_PREFIX = "bench."
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{8}")


def lock_key(run_id: str) -> int:
    """`run_id`'s 32 bits as the signed int4 pg_advisory_lock takes."""
    value = int(run_id, 16)
    return value - 2**32 if value >= 2**31 else value


class LiveRunMark:
    """A run's advisory lock, held on a connection of its own while the run goes on."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._connection = None

    def hold(self, postgres_base: str) -> None:
        self._connection = psycopg2.connect(f"{postgres_base}/postgres")
        self._connection.autocommit = True
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key(self.run_id)))

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def live_run_ids(cursor, database_prefix: str = DATABASE_PREFIX) -> set[str]:
    """The RUN_IDs of the bench runs that hold their lock, or whose databases (named
    `database_prefix`<RUN_ID>_...) something is connected to."""
    cursor.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
                   " AND objsubid = 2", (LOCK_CLASS,))
    live = {f"{objid:08x}" for (objid,) in cursor.fetchall()}
    cursor.execute("SELECT DISTINCT datname FROM pg_stat_activity WHERE datname LIKE %s",
                   (_like_prefix(database_prefix),))
    return live | {run_id for (name,) in cursor.fetchall()
                   if (run_id := _run_id(name, database_prefix, "_"))}


def sweep_leftover_runs(postgres_base: str, redis_url: str, database_prefix: str = DATABASE_PREFIX,
                        key_prefix: str = KEY_PREFIX) -> list[str]:
    """Drop the databases and delete the Redis keys (in the database at `redis_url`) of every bench
    run that is not live; what went, said a line each. A database something connects to as it is
    dropped stays (no FORCE: that run is live after all). (The prefixes: the tests' own, so that
    they sweep nothing of the machine's bench runs.)"""
    said = []
    connection = psycopg2.connect(f"{postgres_base}/postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            live = live_run_ids(cursor, database_prefix)
            cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                           (_like_prefix(database_prefix),))
            for (name,) in cursor.fetchall():
                run_id = _run_id(name, database_prefix, "_")
                if run_id is None or run_id in live:
                    continue
                try:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                except psycopg2.Error as exc:
                    said.append(f"left database {name} of bench run {run_id}: {exc}".strip())
                else:
                    said.append(f"dropped database {name}, left by bench run {run_id}")
    finally:
        connection.close()
    for run_id in sorted(_key_run_ids(redis_url, key_prefix) - live):
        gone = forget_redis_keys(redis_url, f"{key_prefix}{run_id}")
        said.append(f"deleted {gone} Redis key(s) {key_prefix}{run_id}*, left by bench run"
                    f" {run_id}")
    return said


def _key_run_ids(redis_url: str, key_prefix: str) -> set[str]:
    import redis

    client = redis.Redis.from_url(url=redis_url)
    try:
        return {run_id for name in client.scan_iter(match=f"{key_prefix}*", count=1000)
                if (run_id := _run_id(name.decode(errors="replace"), key_prefix, "."))}
    finally:
        client.close()


def _run_id(name: str, prefix: str, separator: str) -> str | None:
    """The RUN_ID in `name` (prefix, 8 hex digits, separator, ...), None if it has none."""
    run_id = name[len(prefix):len(prefix) + 8]
    if (name.startswith(prefix) and RUN_ID_PATTERN.fullmatch(run_id)
            and name[len(prefix) + 8:len(prefix) + 9] == separator):
        return run_id
    return None


def _like_prefix(prefix: str) -> str:
    return prefix.replace("_", "\\_") + "%"
