"""Every connection the shop opens to PostgreSQL gives up on a database it cannot hear from
(shared.db.CONNECTION_TIMEOUTS) instead of waiting on the kernel for minutes or hours, and its
session holds the others up for a bounded time only (shared.db.SESSION_LIMITS): the pooled ones
of the APIs and handlers, the inbox consumer's own and the relay leader's."""

from __future__ import annotations

from contextlib import closing

import psycopg2
import sqlalchemy as sa

from shared.db import (CONNECTION_TIMEOUTS, POOL_WAIT_SECONDS, SESSION_LIMITS, db, driver_dsn,
                       limit_sessions, session_options)
from shared.migrations import migration_engine
from shared.relay_leader import RelayLeaderConnection

EXPECTED = {**{name: str(value) for name, value in CONNECTION_TIMEOUTS.items()},
            "options": session_options(None)}


def _timeouts(connection) -> dict[str, str]:
    """The connection's timeouts as it was opened, and the limits its session runs under."""
    parameters = connection.get_dsn_parameters()
    assert _limits(connection) == SESSION_LIMITS
    return {name: parameters.get(name) for name in EXPECTED}


def _limits(connection) -> dict[str, str]:
    with connection.cursor() as cursor:
        limits = {}
        for name in SESSION_LIMITS:
            cursor.execute(f"SHOW {name}")
            limits[name] = cursor.fetchone()[0]
    return limits


def test_pooled_connections_give_up_on_a_silent_database(in_payments):
    pooled = db.session.connection().connection.driver_connection
    try:
        assert _timeouts(pooled) == EXPECTED
    finally:
        db.session.rollback()


def test_a_request_waits_for_a_pooled_connection_no_longer_than_for_a_lock(in_payments):
    """Every connection of the pool out, the next checkout gives up after POOL_WAIT_SECONDS (the
    API's 503 DATABASE_BUSY; tests/postgres_tools.py: no_connection_free), not SQLAlchemy's 30 s."""
    assert db.engine.pool.timeout() == POOL_WAIT_SECONDS


def test_the_consumers_and_the_relay_leaders_own_connections_do_too(settings, payments_inbox):
    assert payments_inbox([]) == []  # (its connection is opened for the first batch)
    assert _timeouts(payments_inbox._connection) == EXPECTED
    with RelayLeaderConnection(settings.database_url("payments")) as leader:
        assert _timeouts(leader._connection) == EXPECTED


def test_options_the_databases_url_gives_are_kept_and_win_over_the_limits(settings):
    url = (settings.database_url("payments")
           + "?options=-c%20lock_timeout%3D7s%20-c%20work_mem%3D8MB")
    pooled = sa.create_engine(url, connect_args=CONNECTION_TIMEOUTS)
    limit_sessions(pooled)
    try:
        with pooled.connect() as connection:
            _assert_given_options_won(connection.connection.driver_connection)
    finally:
        pooled.dispose()
    with psycopg2.connect(driver_dsn(url)) as connection:
        _assert_given_options_won(connection)
        connection.rollback()


def _assert_given_options_won(connection) -> None:
    assert _limits(connection) == {**SESSION_LIMITS, "lock_timeout": "7s"}
    with connection.cursor() as cursor:
        cursor.execute("SHOW work_mem")
        assert cursor.fetchone()[0] == "8MB"


def test_transactions_read_committed_whatever_the_databases_default(settings):
    """A database (or role) set to REPEATABLE READ by default, as a managed one may be, still has
    the shop's sessions, and the migrations', read each statement's own snapshot
    (shared.db.SESSION_LIMITS, shared.migrations.MIGRATION_LIMITS)."""
    url = settings.database_url("payments")
    database = sa.engine.make_url(url).database
    pooled = sa.create_engine(url, connect_args=CONNECTION_TIMEOUTS)
    limit_sessions(pooled)
    migrating = migration_engine(url)
    with closing(psycopg2.connect(driver_dsn(url))) as admin:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{database}" SET default_transaction_isolation'
                           " = 'repeatable read'")
        try:
            with closing(psycopg2.connect(url.replace("+psycopg2", ""))) as plain:
                assert _isolation(plain) == "repeatable read"  # (the database's default)
            with closing(psycopg2.connect(driver_dsn(url))) as own:
                assert _isolation(own) == "read committed"
            with pooled.connect() as connection:
                assert _isolation(connection.connection.driver_connection) == "read committed"
            with migrating.connect() as connection:  # (the migrations' sessions too)
                assert _isolation(connection.connection.driver_connection) == "read committed"
        finally:
            pooled.dispose()
            migrating.dispose()
            with admin.cursor() as cursor:
                cursor.execute(f'ALTER DATABASE "{database}" RESET default_transaction_isolation')


def _isolation(connection) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW transaction_isolation")
        isolation = cursor.fetchone()[0]
    connection.rollback()
    return isolation
