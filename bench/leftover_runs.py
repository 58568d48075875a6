"""What bench runs that are gone left on the PostgreSQL and Redis the machine shares, and the marks
by which a run still going is told from them.

A bench run on the machine's servers names its databases hseshop_bench_<RUN_ID>_<service> and its
Redis keys bench.<RUN_ID>:... (its REDIS_KEY_PREFIX, run_names_prefix, and the shop's
REDIS_KEY_SEPARATOR: bench.<RUN_ID>:celery:..., bench.<RUN_ID>:orders:...), and forgets them as it
stops (bench.shop.forget_stack_data); one killed outright (SIGKILL, the OOM killer) leaves them
for good. So each run holds, for as long as it goes on, two marks on connections of its own, which
the servers let go of however the run ends, its connections closed with its process: a PostgreSQL
advisory lock (LOCK_CLASS, its RUN_ID), and a Redis connection named hseshop-bench-<RUN_ID>
(CLIENT SETNAME; REDIS_MARK_PREFIX). The Redis mark is for runs on other PostgreSQLs sharing the
Redis: with the machine's PostgreSQL asking for a password, each checkout's bench runs on an
embedded PostgreSQL of its own, and all of them on the machine's Redis database 11.

A run is live while either mark is held, or while anything is connected to one of its databases on
the sweeping run's PostgreSQL (a run of a checkout older than the marks holds none, and its
processes keep connections open; so do processes a killed run left, which the next run in their
folder stops: their data goes with the run after that). A run starting sweeps away, having taken
its own marks first, what runs not live left: their databases, but for one created less than
MIN_DATABASE_AGE_SECONDS before (its age, the modification time of its PG_VERSION file, written as
the database is created and never again: pg_stat_file, a superuser's, as the machine's user is;
one whose age cannot be read is taken for old), for a run of an older checkout has no connection
to its databases for a second or so between one migration's process and the next; and their Redis
keys, of a run with no database left on this PostgreSQL (so its keys go with its databases, and
a run killed before it made any, or on another PostgreSQL, loses its keys alone). A run starting
beside the sweep takes its marks before it makes anything, and so is never swept. What is left: a
run of a checkout older than the marks, on another PostgreSQL sharing the Redis, has its keys
taken for a gone run's; and a mark's connection cut (a server restarted) is not made again.
"""

from __future__ import annotations

import re

import psycopg2

from devstack.infra import forget_redis_keys
from shared.config import REDIS_KEY_SEPARATOR

# The first key of every bench run's lock ("bnch"); the second is its RUN_ID's 32 bits.
LOCK_CLASS = 0x626E6368
DATABASE_PREFIX = "hseshop_bench_"
KEY_PREFIX = "bench."
REDIS_MARK_PREFIX = "hseshop-bench-"
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
# A database younger than this is not dropped, whatever its run's marks say.
MIN_DATABASE_AGE_SECONDS = 600.0


def run_names_prefix(run_id: str, key_prefix: str = KEY_PREFIX) -> str:
    """The prefix of a run's Redis keys (its REDIS_KEY_PREFIX), topics and consumer groups."""
    return f"{key_prefix}{run_id}"


def lock_key(run_id: str) -> int:
    """`run_id`'s 32 bits as the signed int4 pg_advisory_lock takes."""
    value = int(run_id, 16)
    return value - 2**32 if value >= 2**31 else value


class LiveRunMark:
    """A run's advisory lock and its named Redis connection, held while the run goes on."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._connection = None
        self._redis = None

    def hold(self, postgres_base: str, redis_url: str) -> None:
        import redis

        self._connection = psycopg2.connect(f"{postgres_base}/postgres")
        self._connection.autocommit = True
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key(self.run_id)))
        self._redis = redis.Redis.from_url(redis_url, single_connection_client=True,
                                           client_name=f"{REDIS_MARK_PREFIX}{self.run_id}")
        self._redis.ping()  # (connects, named)

    def release(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
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


def redis_marked_run_ids(client) -> set[str]:
    """The RUN_IDs of the bench runs holding their named connection to the Redis of `client`."""
    return {run_id for entry in client.client_list()
            if (run_id := _run_id(entry.get("name", ""), REDIS_MARK_PREFIX, ""))}


def sweep_leftover_runs(postgres_base: str, redis_url: str, database_prefix: str = DATABASE_PREFIX,
                        key_prefix: str = KEY_PREFIX,
                        min_database_age: float = MIN_DATABASE_AGE_SECONDS) -> list[str]:
    """Drop the databases and delete the Redis keys (in the database at `redis_url`) of every bench
    run that is not live, as the module says; what went, and what was left of a run not live, said
    a line each. A database something connects to as it is dropped stays (no FORCE: that run is
    live after all). (The prefixes and age: the tests' own, so that they sweep nothing of the
    machine's bench runs.)"""
    import redis

    said = []
    keys = redis.Redis.from_url(url=redis_url)
    connection = psycopg2.connect(f"{postgres_base}/postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            live = live_run_ids(cursor, database_prefix) | redis_marked_run_ids(keys)
            kept = set(live)
            for name, age in _databases_and_ages(cursor, database_prefix):
                run_id = _run_id(name, database_prefix, "_")
                if run_id is None or run_id in live:
                    continue
                if age is not None and age < min_database_age:
                    kept.add(run_id)
                    said.append(f"left database {name} of bench run {run_id}: made {age:.0f} s"
                                f" ago, less than {min_database_age:.0f} s")
                    continue
                try:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                except psycopg2.Error as exc:
                    kept.add(run_id)
                    said.append(f"left database {name} of bench run {run_id}: {exc}".strip())
                else:
                    said.append(f"dropped database {name}, left by bench run {run_id}")
        for run_id in sorted(_key_run_ids(keys, key_prefix) - kept):
            namespace = f"{run_names_prefix(run_id, key_prefix)}{REDIS_KEY_SEPARATOR}"
            gone = forget_redis_keys(redis_url, namespace)
            said.append(f"deleted {gone} Redis key(s) {namespace}*, left by bench run {run_id}")
    finally:
        connection.close()
        keys.close()
    return said


def _databases_and_ages(cursor, database_prefix: str) -> list[tuple[str, float | None]]:
    """The names of the databases named `database_prefix`..., each with its age in seconds (None
    where it cannot be read: pg_stat_file refused, or its PG_VERSION elsewhere)."""
    cursor.execute("SELECT datname, oid FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                   (_like_prefix(database_prefix),))
    databases = cursor.fetchall()
    try:
        cursor.execute(
            "SELECT extract(epoch FROM now() - (pg_stat_file(path, true)).modification)::float8"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS file(path, n) ORDER BY n",
            ([f"base/{oid}/PG_VERSION" for _name, oid in databases],))
    except psycopg2.errors.InsufficientPrivilege:
        return [(name, None) for name, _oid in databases]
    return [(name, age) for (name, _oid), (age,) in zip(databases, cursor.fetchall())]


def _key_run_ids(client, key_prefix: str) -> set[str]:
    return {run_id for name in client.scan_iter(match=f"{key_prefix}*", count=1000)
            if (run_id := _run_id(name.decode(errors="replace"), key_prefix,
                                  REDIS_KEY_SEPARATOR))}


def _run_id(name: str, prefix: str, separator: str) -> str | None:
    """The RUN_ID in `name` (prefix, 8 hex digits, separator, ...; with no separator, nothing
    after them), None if it has none."""
    run_id = name[len(prefix):len(prefix) + 8]
    rest = name[len(prefix) + 8:]
    if (name.startswith(prefix) and RUN_ID_PATTERN.fullmatch(run_id)
            and (rest.startswith(separator) if separator else rest == "")):
        return run_id
    return None


def _like_prefix(prefix: str) -> str:
    return prefix.replace("_", "\\_") + "%"
