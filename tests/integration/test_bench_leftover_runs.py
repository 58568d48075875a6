"""A bench run starting sweeps away the databases and Redis keys that bench runs killed outright
left on the shared PostgreSQL and Redis, and nothing of a run still live: one holding its lock
(bench.leftover_runs.LiveRunMark), or one whose database something is connected to (a run of a
checkout that takes no lock)."""

from __future__ import annotations

import uuid

import psycopg2
import pytest
import redis

from bench.leftover_runs import LiveRunMark, sweep_leftover_runs
from bench.shop import REDIS_DB


# The test's own names, for its sweeps to touch nothing of the machine's bench runs.
DATABASE_PREFIX = f"hseshop_sweeptest_{uuid.uuid4().hex[:6]}_"
KEY_PREFIX = f"sweeptest.{uuid.uuid4().hex[:6]}."


def _run_id() -> str:
    return uuid.uuid4().hex[:8]


def _sweep(infrastructure) -> list[str]:
    return sweep_leftover_runs(infrastructure.postgres_base,
                               f"{infrastructure.redis_base}/{REDIS_DB}", DATABASE_PREFIX,
                               KEY_PREFIX)


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


def test_a_run_that_is_gone_is_swept_and_a_live_one_kept(infrastructure, server):
    connection, make_database = server
    gone, locked, connected = _run_id(), _run_id(), _run_id()
    databases = {run_id: make_database(f"{DATABASE_PREFIX}{run_id}_orders")
                 for run_id in (gone, locked, connected)}
    redis_url = f"{infrastructure.redis_base}/{REDIS_DB}"
    keys = redis.Redis.from_url(redis_url)
    for run_id in (gone, locked, connected):
        keys.set(f"{KEY_PREFIX}{run_id}.celery", "queued")
    mark = LiveRunMark(locked)
    mark.hold(infrastructure.postgres_base)
    client = psycopg2.connect(f"{infrastructure.postgres_base}/{databases[connected]}")
    try:
        said = _sweep(infrastructure)

        present = _databases(connection)
        assert databases[gone] not in present
        assert {databases[locked], databases[connected]} <= present
        assert keys.get(f"{KEY_PREFIX}{gone}.celery") is None
        for run_id in (locked, connected):
            assert keys.get(f"{KEY_PREFIX}{run_id}.celery") == b"queued"
        assert f"dropped database {databases[gone]}, left by bench run {gone}" in said
    finally:
        client.close()
        mark.release()
        for run_id in (gone, locked, connected):
            keys.delete(f"{KEY_PREFIX}{run_id}.celery")
        keys.close()


def test_a_runs_lock_goes_with_its_connection(infrastructure, server):
    """As a run killed outright: its connection closed by the kernel, its run is live no more."""
    connection, make_database = server
    run_id = _run_id()
    database = make_database(f"{DATABASE_PREFIX}{run_id}_payments")
    mark = LiveRunMark(run_id)
    mark.hold(infrastructure.postgres_base)
    assert _sweep(infrastructure) == [] and database in _databases(connection)
    mark.release()
    assert _sweep(infrastructure) == [f"dropped database {database}, left by bench run {run_id}"]
    assert database not in _databases(connection)
