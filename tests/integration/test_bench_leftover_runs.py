"""A bench run starting sweeps away the databases and Redis keys that bench runs killed outright
left on the shared PostgreSQL and Redis, and nothing of a run still live: one holding its lock or
its named Redis connection (bench.leftover_runs.LiveRunMark: the latter a run on another
PostgreSQL sharing the Redis), or one whose database something is connected to (a run of a
checkout that takes no lock), nor a database made minutes ago (a run of such a checkout between
two migrations). The keys planted are of the form the shop writes (REDIS_KEY_PREFIX, ':')."""

from __future__ import annotations

import uuid

import psycopg2
import pytest
import redis

from bench.leftover_runs import REDIS_MARK_PREFIX, LiveRunMark, sweep_leftover_runs
from bench.shop import REDIS_DB


# The test's own names, for its sweeps to touch nothing of the machine's bench runs.
DATABASE_PREFIX = f"hseshop_sweeptest_{uuid.uuid4().hex[:6]}_"
KEY_PREFIX = f"sweeptest.{uuid.uuid4().hex[:6]}."


def _run_id() -> str:
    return uuid.uuid4().hex[:8]


def _sweep(infrastructure, **age) -> list[str]:
    """A sweep of the test's names, taking any database for old unless told its minimum age."""
    return sweep_leftover_runs(infrastructure.postgres_base,
                               f"{infrastructure.redis_base}/{REDIS_DB}", DATABASE_PREFIX,
                               KEY_PREFIX, min_database_age=age.get("min_database_age", 0))


def _keys_of(run_id: str) -> list[str]:
    """Keys as a run's shop writes them: Celery's (global_keyprefix), the read cache's."""
    return [f"{KEY_PREFIX}{run_id}:celery:unacked", f"{KEY_PREFIX}{run_id}:celery:_kombu.binding.x",
            f"{KEY_PREFIX}{run_id}:orders:v1:orders:list"]


@pytest.fixture
def keys(infrastructure):
    client = redis.Redis.from_url(f"{infrastructure.redis_base}/{REDIS_DB}")
    planted: list[str] = []

    def plant(run_id: str) -> list[str]:
        names = _keys_of(run_id)
        for name in names:
            client.set(name, "left")
        planted.extend(names)
        return names

    yield client, plant
    if planted:
        client.delete(*planted)
    client.close()


@pytest.fixture
def server(infrastructure):
    connection = psycopg2.connect(f"{infrastructure.postgres_base}/postgres")
    connection.autocommit = True
    made: list[str] = []

    def make_database(name: str) -> str:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return name

    yield connection, make_database
    with connection.cursor() as cursor:
        for name in made:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


def _databases(connection) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database")
        return {name for (name,) in cursor.fetchall()}


def test_a_run_that_is_gone_is_swept_and_a_live_one_kept(infrastructure, server, keys):
    connection, make_database = server
    client, plant = keys
    gone, locked, connected = _run_id(), _run_id(), _run_id()
    databases = {run_id: make_database(f"{DATABASE_PREFIX}{run_id}_orders")
                 for run_id in (gone, locked, connected)}
    planted = {run_id: plant(run_id) for run_id in (gone, locked, connected)}
    mark = LiveRunMark(locked)
    mark.hold(infrastructure.postgres_base, f"{infrastructure.redis_base}/{REDIS_DB}")
    psql = psycopg2.connect(f"{infrastructure.postgres_base}/{databases[connected]}")
    try:
        said = _sweep(infrastructure)

        present = _databases(connection)
        assert databases[gone] not in present
        assert {databases[locked], databases[connected]} <= present
        assert client.exists(*planted[gone]) == 0
        for run_id in (locked, connected):
            assert client.exists(*planted[run_id]) == len(planted[run_id])
        assert f"dropped database {databases[gone]}, left by bench run {gone}" in said
        assert (f"deleted 3 Redis key(s) {KEY_PREFIX}{gone}:*, left by bench run {gone}"
                in said)
    finally:
        psql.close()
        mark.release()


def test_a_run_marked_live_on_redis_alone_keeps_its_keys(infrastructure, server, keys):
    """A run on another PostgreSQL (its databases and lock there) sharing the Redis: its named
    connection keeps its keys; a run's keys with neither mark nor database go."""
    client, plant = keys
    elsewhere, gone = _run_id(), _run_id()
    planted = {run_id: plant(run_id) for run_id in (elsewhere, gone)}
    named = redis.Redis.from_url(f"{infrastructure.redis_base}/{REDIS_DB}",
                                 single_connection_client=True,
                                 client_name=f"{REDIS_MARK_PREFIX}{elsewhere}")
    named.ping()
    try:
        said = _sweep(infrastructure)

        assert client.exists(*planted[elsewhere]) == len(planted[elsewhere])
        assert client.exists(*planted[gone]) == 0
        assert not [line for line in said if elsewhere in line]
    finally:
        named.close()
    assert _sweep(infrastructure) == [
        f"deleted 3 Redis key(s) {KEY_PREFIX}{elsewhere}:*, left by bench run {elsewhere}"]


def test_a_database_made_minutes_ago_stays_with_its_keys(infrastructure, server, keys):
    """A run of a checkout that takes no lock, between two of its migrations: nothing connected
    to its databases for a second, made a moment ago."""
    connection, make_database = server
    client, plant = keys
    run_id = _run_id()
    database = make_database(f"{DATABASE_PREFIX}{run_id}_orders")
    planted = plant(run_id)

    said = _sweep(infrastructure, min_database_age=600)

    assert database in _databases(connection)
    assert client.exists(*planted) == len(planted)
    assert len(said) == 1 and said[0].startswith(
        f"left database {database} of bench run {run_id}: made ")
    assert _sweep(infrastructure) == [
        f"dropped database {database}, left by bench run {run_id}",
        f"deleted 3 Redis key(s) {KEY_PREFIX}{run_id}:*, left by bench run {run_id}"]


def test_a_runs_lock_goes_with_its_connection(infrastructure, server):
    """As a run killed outright: its connection closed by the kernel, its run is live no more."""
    connection, make_database = server
    run_id = _run_id()
    database = make_database(f"{DATABASE_PREFIX}{run_id}_payments")
    mark = LiveRunMark(run_id)
    mark.hold(infrastructure.postgres_base, f"{infrastructure.redis_base}/{REDIS_DB}")
    assert _sweep(infrastructure) == [] and database in _databases(connection)
    mark.release()
    assert _sweep(infrastructure) == [f"dropped database {database}, left by bench run {run_id}"]
    assert database not in _databases(connection)
