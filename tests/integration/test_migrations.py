"""Schema migrations against real PostgreSQL: rows waiting in the outbox survive them, both ways."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from devstack.infra import free_port, start_embedded_postgres
from gateway_app.models import User
from gateway_app.usernames import username_key, username_key_of
from shared.config import SERVICES, SERVICES_KEEPING_IDEMPOTENCY_KEYS, load_settings
from shared.db import SESSION_LIMITS, driver_dsn
from shared.idempotency import IdempotencyKey
from shared.inbox.parked import count_parked_messages, last_parked, parked_batch, parked_messages
from shared.inbox.pruning import prune_handled_messages
from shared.migration_steps import DowngradeRefused, UpgradeRefused
from shared.migrations import (MIGRATION_LIMITS, MIGRATION_LOCK_KEY, ServerTooOld,
                               alembic_config, downgrade, ensure_database, main, upgrade)
from shared.outbox.parked import last_parked_outbox_row, parked_outbox_batch
from shared.outbox.relaying import CLAIM_ROWS, count_parked_outbox_messages
from shared.schema_drift import schema_drift
from tests.environment import database_name
from tests.polling import wait_for
from tests.postgres_tools import drop_database, other_sessions
from tests.process_tools import start_child


def _seconds(timeout: str) -> int:
    """A timeout setting in whole seconds ("2s") as a number."""
    return int(timeout.removesuffix("s"))


# A second longer than a migration's statement waits for a lock, as an interval.
PAST_A_MIGRATIONS_LOCK_WAIT = f"{_seconds(MIGRATION_LIMITS['lock_timeout']) + 1}s"

PENDING_PAYLOAD = {"order_id": "o-1", "user_id": "u-1", "amount": "1.00"}


@pytest.mark.parametrize("service", ["orders", "payments"])
def test_an_unsent_outbox_row_keeps_its_message_through_the_envelope_migration_and_back(
        infrastructure, service):
    url = (f"{infrastructure.postgres_base}/{database_name('migrations', service)}"
           .replace("postgresql://", "postgresql+psycopg2://"))
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "0004")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, payload,"
            " request_id, created_at) VALUES ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic',"
            " 'u-1', 'PaymentRequested', 'o-1', %s, 'r-1', '2026-11-26 12:00:00.5+00')",
            (json.dumps(PENDING_PAYLOAD),))
    connection.close()

    command.upgrade(config, "head")
    assert _read(url, "envelope::text") == {
        "message_id": "6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11", "type": "PaymentRequested",
        "version": 1, "occurred_at": "2026-11-26T12:00:00.500000+00:00", "correlation_id": "o-1",
        "payload": PENDING_PAYLOAD}
    command.downgrade(config, "0004")
    assert _read(url, "payload::text") == PENDING_PAYLOAD
    command.upgrade(config, "head")
    assert _read(url, "envelope::text")["payload"] == PENDING_PAYLOAD


@pytest.mark.parametrize("service", SERVICES)
def test_every_services_outbox_holds_what_the_relay_reads(infrastructure, service):
    """Beat runs a relay for every service, the gateway's included (it writes no outbox rows yet):
    each database, migrated to its head, must answer the relay's read."""
    url = (f"{infrastructure.postgres_base}/{database_name('relay-reads', service)}"
           .replace("postgresql://", "postgresql+psycopg2://"))
    ensure_database(url)
    command.upgrade(alembic_config(service, url), "head")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(CLAIM_ROWS, {"batch_size": 1})
        assert cursor.fetchall() == []
    connection.close()


@pytest.mark.parametrize("service", SERVICES_KEEPING_IDEMPOTENCY_KEYS)
def test_the_services_idempotency_keys_are_indexed_by_age_for_pruning(infrastructure, service):
    """Beat prunes the expired idempotency keys of the services that keep them, found by an index
    of their age (revision 0009); its downgrade drops it."""
    url = _database_url(infrastructure, "key-ages", service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "head")
    assert _index_valid(url, "ix_idempotency_keys_created_at")
    command.downgrade(config, "0008")
    assert _index_valid(url, "ix_idempotency_keys_created_at") is None
    command.upgrade(config, "head")


def test_the_gateway_keeps_no_idempotency_keys_and_its_downgrade_makes_their_table_again(
        infrastructure):
    """The gateway passes the key on to the services: revision 0013 drops the table its first
    revision made with the outbox and inbox (indexed by age in 0008, with the answers' texts in
    0012); the downgrade makes it again as 0012 left it, and 0012's own downgrade finds it so."""
    url = _database_url(infrastructure, "no-keys", "gateway")
    as_0012_left_it = _database_url(infrastructure, "keys-at-0012", "gateway")
    for database in (url, as_0012_left_it):
        ensure_database(database)
    command.upgrade(alembic_config("gateway", as_0012_left_it), "0012")
    config = alembic_config("gateway", url)
    command.upgrade(config, "head")
    assert not _table_exists(url, "idempotency_keys")
    command.downgrade(config, "0012")
    # (Read from the catalog: Alembic's comparison sees neither defaults nor constraints' names.)
    assert (_table_definition(url, IdempotencyKey.__tablename__)
            == _table_definition(as_0012_left_it, IdempotencyKey.__tablename__))
    assert _index_valid(url, "ix_idempotency_keys_created_at")
    command.downgrade(config, "0007")  # (through 0008's downgrade, which drops the age index)
    assert _index_valid(url, "ix_idempotency_keys_created_at") is None
    command.upgrade(config, "head")
    assert not _table_exists(url, "idempotency_keys")


# The gateway's revision that keys each user by the username's case-folded form, and the one below.
USERNAME_KEYS, BELOW_USERNAME_KEYS = "0018", "0017"
# Its unique index of the key.
USERNAME_KEY_INDEX = "ix_users_username_key"


def test_each_user_is_keyed_by_the_username_folded_as_sign_in_folds_it_those_of_before_too(
        infrastructure):
    """The gateway's revision 0018 indexes each user, those signed up before included, by the
    key sign-in finds them by (gateway_app/usernames.py), PostgreSQL's expression equal to
    Python's, unique; the release before, which writes no key, signs users up all the same, but no
    case variant of a username taken. Its downgrade takes the index away, every user kept."""
    url = _database_url(infrastructure, "username-keys", "gateway")
    ensure_database(url)
    config = alembic_config("gateway", url)
    command.upgrade(config, BELOW_USERNAME_KEYS)
    _add_users(url, "Alice.Smith-9_", "bob")
    command.upgrade(config, USERNAME_KEYS)
    _add_users(url, "CAROL")  # as the release before signs a user up
    assert _index_valid(url, USERNAME_KEY_INDEX)
    names = ("Alice.Smith-9_", "bob", "CAROL")
    for name in names:  # found through the index, by the key as Python folds it
        assert _plan_and_row(url, username_key(name)) == (USERNAME_KEY_INDEX, name)
    assert {username_key(name) for name in names} == {"alice.smith-9_", "bob", "carol"}
    with pytest.raises(psycopg2.errors.UniqueViolation):
        _add_users(url, "BOB")
    command.upgrade(config, "head")  # (the models are the head's: revisions after it too)
    assert _drift("gateway", url) == []

    command.downgrade(config, BELOW_USERNAME_KEYS)
    assert sorted(_rows(url, "SELECT username FROM users")) == [
        ("Alice.Smith-9_",), ("CAROL",), ("bob",)]
    assert _index_valid(url, USERNAME_KEY_INDEX) is None
    command.upgrade(config, "head")


def _plan_and_row(url: str, key: str) -> tuple[str | None, str | None]:
    """The index sign-in's read of the user with the username key `key` goes through (as its plan
    names it, the statement as SQLAlchemy sends it, sequential scans off: no index matching it,
    the plan names none), and the username found."""
    engine = sa.create_engine(url)
    sent = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda _conn, _cursor, statement, parameters, *_: sent.append(
                        (statement, parameters)))
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SET enable_seqscan = off")
            username = connection.scalar(
                sa.select(User.username).where(username_key_of(User.username) == key))
            statement, parameters = sent[-1]
            plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}",
                                              parameters).scalar()[0]["Plan"]
    finally:
        engine.dispose()
    return plan.get("Index Name"), username


def test_the_username_keys_revision_refuses_users_whose_usernames_differ_only_in_case(
        infrastructure):
    """Two users whose usernames differ only in case cannot both keep the one key: which is the
    name's own is the operator's to say. The upgrade exits 1 in one line naming each clash, its
    users oldest first, and the way out; nothing changed, no user lost. Renamed, it goes
    through."""
    url = _database_url(infrastructure, "username-clashes", "gateway")
    ensure_database(url)
    command.upgrade(alembic_config("gateway", url), BELOW_USERNAME_KEYS)
    _add_users(url, "bob", "alice", "ALICE", "Alice", "carol", "Bob", created_at=[
        "2026-01-05", "2026-01-02", "2026-01-03", "2026-01-01", "2026-01-04", "2026-01-06"])
    schema, users = _schema(url), _rows(url, "SELECT * FROM users ORDER BY id")

    error = _the_one_error_line(_migrate_by_hand("gateway", url, "upgrade", "gateway"))
    assert error == (
        "ERROR shared.migrations: 2 username(s) are held by two users or more in cases that"
        " differ, which this release takes for one username (a username is unique whatever its"
        " case, and signs in typed in any): 'Alice' (usr_Alice), 'alice' (usr_alice), 'ALICE'"
        " (usr_ALICE); 'bob' (usr_bob), 'Bob' (usr_Bob). Rename all but one user of each (UPDATE"
        " users SET username = 'NEW' WHERE id = 'ID', a name of A-Za-z0-9_.- no other user holds"
        " in any case; its user signs in under it from then on: tell them), then upgrade again;"
        " the gateway database stays at revision 0017, nothing was changed")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == BELOW_USERNAME_KEYS
    assert _schema(url) == schema
    assert _rows(url, "SELECT * FROM users ORDER BY id") == users

    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        for user_id, renamed in (("usr_alice", "alice-2"), ("usr_ALICE", "alice-3"),
                                 ("usr_Bob", "bob-2")):
            cursor.execute("UPDATE users SET username = %s WHERE id = %s", (renamed, user_id))
    connection.close()
    migrating = _migrate_by_hand("gateway", url, "upgrade", "gateway")
    assert migrating.returncode == 0, migrating.stderr
    assert _index_valid(url, USERNAME_KEY_INDEX)


def test_a_case_variant_signed_up_while_the_username_keys_index_is_built_is_refused_alike(
        infrastructure):
    """The clashes are asked for before the index is built (concurrently, under no lock that
    holds the shop up): a case variant the release before signs up meanwhile fails the build's
    uniqueness, and the upgrade is refused in the same words, its invalid index dropped (it would
    go on refusing sign-ups), the database at 0017. Renamed, it goes through."""
    url = _database_url(infrastructure, "username-clash-meanwhile", "gateway")
    ensure_database(url)
    config = alembic_config("gateway", url)
    command.upgrade(config, BELOW_USERNAME_KEYS)
    _add_users(url, "alice", created_at=["2026-01-01"])
    dsn = driver_dsn(url)
    signing_up = psycopg2.connect(dsn)  # the release before's sign-up, open as the build begins
    failures = []

    def upgrade() -> None:
        try:
            command.upgrade(config, USERNAME_KEYS)
        except Exception as exc:
            failures.append(exc)

    upgrading = threading.Thread(target=upgrade, daemon=True)
    watcher = psycopg2.connect(dsn)
    watcher.autocommit = True
    try:
        with signing_up.cursor() as cursor:
            cursor.execute("INSERT INTO users (id, username, password_hash, created_at) VALUES"
                           " ('usr_ALICE', 'ALICE', 'scrypt$...', '2026-01-02')")
        upgrading.start()
        with watcher.cursor() as cursor:
            def build_waiting() -> bool:
                return other_sessions(cursor, "query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%%'"
                                               " AND wait_event = 'virtualxid'") == 1

            wait_for(build_waiting, timeout=20, what="the index build to wait for the sign-up")
        signing_up.commit()
    finally:
        watcher.close()
        signing_up.rollback()
        signing_up.close()
        upgrading.join(30)
    assert not upgrading.is_alive()
    assert [type(failure) for failure in failures] == [UpgradeRefused]
    assert " ".join(str(failures[0]).split()).startswith(
        "1 username(s) are held by two users or more in cases that differ, which this release"
        " takes for one username (a username is unique whatever its case, and signs in typed in"
        " any): 'alice' (usr_alice), 'ALICE' (usr_ALICE). Rename all but one user of each")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == BELOW_USERNAME_KEYS
    assert _index_valid(url, USERNAME_KEY_INDEX) is None
    _add_users(url, "Bob", "BOB")  # (no index left refusing the release before's sign-ups)

    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("UPDATE users SET username = username || '-2' WHERE id IN"
                       " ('usr_ALICE', 'usr_BOB')")
    connection.close()
    command.upgrade(config, USERNAME_KEYS)
    assert _index_valid(url, USERNAME_KEY_INDEX)
    command.upgrade(config, "head")


# Users enough that rewriting their table, or building a constraint's index, under a lock that
# holds their readers up, takes longer than a signed-in request waits for it.
MANY_USERS = 150_000
# What a signed-in request's read of its user waits at most, for a lock and to be answered
# (gateway_app/sign_out.py).
A_READS_LIMIT = "1s"


def test_the_username_keys_revision_holds_no_read_of_the_users_up(infrastructure):
    """Every signed-in request reads its user's row (gateway_app/sign_out.py, within a second):
    revision 0018, run on a table of many users while the shop reads it, fails none of those
    reads (its index built concurrently, no column added, no table rewritten)."""
    url = _database_url(infrastructure, "username-key-reads", "gateway")
    ensure_database(url)
    config = alembic_config("gateway", url)
    command.upgrade(config, BELOW_USERNAME_KEYS)
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("INSERT INTO users (id, username, password_hash) SELECT 'usr_' || n,"
                       " 'User-' || n, repeat('h', 100) FROM generate_series(1, %s) AS n",
                       (MANY_USERS,))
    connection.close()
    upgraded = threading.Event()
    reads, failures = [], []

    def read_users_until_upgraded() -> None:
        reader = psycopg2.connect(driver_dsn(url))
        reader.autocommit = True
        deadline = time.monotonic() + 120
        try:
            with reader.cursor() as cursor:
                cursor.execute("SET lock_timeout = %s; SET statement_timeout = %s",
                               (A_READS_LIMIT, A_READS_LIMIT))
                while not upgraded.is_set() and time.monotonic() < deadline:
                    try:
                        cursor.execute("SELECT token_generation FROM users WHERE id = %s",
                                       (f"usr_{len(reads) % MANY_USERS + 1}",))
                        reads.append(cursor.fetchone())
                    except psycopg2.errors.QueryCanceled as exc:  # (either timeout's)
                        failures.append(str(exc).strip())
        finally:
            reader.close()

    reading = threading.Thread(target=read_users_until_upgraded, daemon=True)
    reading.start()
    try:
        wait_for(lambda: len(reads) > 0, timeout=20, what="the users to be read")
        command.upgrade(config, USERNAME_KEYS)
    finally:
        upgraded.set()
        reading.join(30)
    assert not reading.is_alive()
    assert failures == []
    assert _index_valid(url, USERNAME_KEY_INDEX)


def _add_users(url: str, *usernames: str, created_at: list[str] | None = None) -> None:
    """Users signed up as the release before 0018 signs them up (no key written), each with the
    id `usr_<username>`, signed up at `created_at` (now if not given)."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        for username, when in zip(usernames, created_at or [None] * len(usernames)):
            cursor.execute("INSERT INTO users (id, username, password_hash, created_at)"
                           " VALUES (%s, %s, 'scrypt$...', coalesce(%s::timestamptz, now()))",
                           (f"usr_{username}", username, when))
    connection.close()


def _rows(url: str, query: str) -> list[tuple]:
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(query)
        rows = cursor.fetchall()
    connection.close()
    return rows


@pytest.mark.parametrize("service", SERVICES)
def test_every_services_migrated_database_is_as_its_models_declare_it(infrastructure, service):
    """Migrations and models agree: no table, column (and its type), index or constraint that one
    has and the other has not, and none under another name (the models name the constraints the
    first migrations left to PostgreSQL as PostgreSQL named them)."""
    url = _database_url(infrastructure, "as-declared", service)
    ensure_database(url)
    command.upgrade(alembic_config(service, url), "head")
    assert _drift(service, url) == []


@pytest.mark.parametrize("service", SERVICES)
def test_an_operators_parked_messages_are_read_through_an_index_of_the_parked_rows(
        infrastructure, service):
    """`python -m tasks.parked list`, --all's batches and the sweeper's reminder of them read the
    parked inbox rows through an index of them alone (every inbox's revision after 0012, the
    gateway's after 0013), not the whole inbox (a few million rows: a statement ran past the
    statement timeout); the revision's downgrade drops it."""
    url, config = _migrated_to_its_head(infrastructure, "parked-index", service)
    assert _index_valid(url, "ix_inbox_messages_parked")
    _filled_and_analysed(url, "inbox_messages",
                         "INSERT INTO inbox_messages (message_id, topic, partition, \"offset\","
                         " processed_at, parked_at) SELECT gen_random_uuid(), 'topic', 0, n,"
                         " CASE WHEN n % 200 <> 0 THEN now() END,"
                         " CASE WHEN n % 200 = 0 THEN now() - n * interval '1 second' END"
                         " FROM generate_series(1, 20000) AS n")

    engine, statements = _engine_noting_its_statements(url)
    try:
        with Session(engine) as session:
            assert len(parked_messages(session, 50)) == 50
            through = last_parked(session)
            first = parked_batch(session, through, None, 60)
            assert len(first) == 60 and len(parked_batch(session, through, first[-1], 60)) == 40
            assert count_parked_messages(session) == 100  # (the sweeper's reminder)
        plans = _plans(engine, statements)
        assert len(plans) == 5
        for plan in plans:
            assert "ix_inbox_messages_parked" in plan and "Seq Scan" not in plan, plan
    finally:
        engine.dispose()
    command.downgrade(config, "0013" if service == "gateway" else "0012")
    assert _index_valid(url, "ix_inbox_messages_parked") is None
    command.upgrade(config, "head")


# Each service's revision below the one that indexes the parked outbox rows by id.
BELOW_THE_OUTBOX_PARKED_INDEX = {"orders": "0015", "payments": "0015", "gateway": "0016"}


@pytest.mark.parametrize("service", SERVICES)
def test_an_operators_parked_outbox_rows_are_read_through_an_index_of_the_parked_rows_by_id(
        infrastructure, service):
    """`python -m tasks.parked replay/discard --outbox --all` find the last parked row, and read
    their batches, in the order the rows were written through an index of the parked rows alone
    (and the relay counts them there): the last was found by walking the outbox back from its
    newest row over every row written after it, and a batch read every refused row waiting for
    its next try, or every row between two parked ones, however few were parked. Here the parked
    rows are the oldest, behind them rows waiting and rows refused for the broker's sake, their
    next try to come. The revision's downgrade drops the index."""
    url, config = _migrated_to_its_head(infrastructure, "outbox-parked-index", service)
    assert _index_valid(url, "ix_outbox_messages_parked_by_id")
    _filled_and_analysed(
        url, "outbox_messages", "TRUNCATE outbox_messages",
        "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
        " next_attempt_at, parked_at) SELECT gen_random_uuid(), 'topic', 'key-' || n % 500,"
        " 'PaymentRequested', '{}', CASE WHEN n <= 100 OR n % 4 = 0 THEN 1 ELSE 0 END,"
        " CASE WHEN n > 100 AND n % 4 = 0 THEN now() + interval '30 s' END,"
        " CASE WHEN n <= 100 THEN now() END FROM generate_series(1, 40000) AS n")

    engine, statements = _engine_noting_its_statements(url)
    try:
        with Session(engine) as session:
            through = last_parked_outbox_row(session)
            first = parked_outbox_batch(session, through, None, 60)
            assert len(first) == 60 and len(parked_outbox_batch(session, through, first[-1],
                                                                60)) == 40
            with session.connection().connection.cursor() as cursor:
                assert count_parked_outbox_messages(cursor) == 100
        plans = _plans(engine, statements)
        assert len(plans) == 3
        for plan in plans:
            assert "ix_outbox_messages_parked_by_id" in plan, plan
        with engine.connect() as connection:
            with connection.connection.cursor() as cursor:
                cursor.execute("EXPLAIN SELECT count(*) FROM outbox_messages WHERE attempts > 0"
                               " AND parked_at IS NOT NULL")
                assert "ix_outbox_messages_parked_by_id" in str(cursor.fetchall())
    finally:
        engine.dispose()
    command.downgrade(config, BELOW_THE_OUTBOX_PARKED_INDEX[service])
    assert _index_valid(url, "ix_outbox_messages_parked_by_id") is None
    command.upgrade(config, "head")


# Each service's revision below the one that keeps inbox rows' value digests (and indexes the
# handled rows by when they were handled).
BELOW_THE_VALUE_DIGEST = {"orders": "0014", "payments": "0014", "gateway": "0015"}


@pytest.mark.parametrize("service", SERVICES)
def test_inbox_rows_keep_their_values_digest_those_of_before_none(infrastructure, service):
    """Every inbox keeps the digest of the value each row was stored from (orders' and payments'
    revision 0015, the gateway's 0016): the rows stored before, and those the release before goes
    on storing without it, have none (a record under their id is told from a repeat as before:
    shared.inbox.taken_ids). The downgrade drops the column, and makes the handled rows' index
    by when they were stored again, in place of the revision's by when they were handled: the
    inbox as it was."""
    url, config, inbox_before = _inbox_rows_stored_either_side_of(
        infrastructure, "value-digest", service, BELOW_THE_VALUE_DIGEST[service])
    assert _index_valid(url, "ix_inbox_messages_handled_at")
    assert _index_valid(url, "ix_inbox_messages_handled") is None
    assert _scalar(url, "SELECT count(*) FROM inbox_messages WHERE value_digest IS NULL") == 2
    _assert_going_down_leaves_the_inbox_as_it_was(url, config, BELOW_THE_VALUE_DIGEST[service],
                                                  inbox_before)


@pytest.mark.parametrize("service", SERVICES)
def test_old_handled_inbox_rows_are_pruned_through_an_index_of_when_they_were_handled(
        infrastructure, service):
    """The pruner deletes the rows handled (or discarded) and stored a retention ago, oldest
    handled first, found through an index of the handled rows by when they were handled. Found
    through the one by when they were stored, the rows of messages handled late (here a backlog
    of parked messages, stored long ago, discarded an hour ago) were each read from the table and
    passed over by every transaction of every run, for a whole retention."""
    url, _ = _migrated_to_its_head(infrastructure, "handled-at-index", service)
    _filled_and_analysed(url, "inbox_messages",
                         "INSERT INTO inbox_messages (message_id, topic, partition, \"offset\","
                         " received_at, processed_at) SELECT gen_random_uuid(), 'topic', 0, n,"
                         " now() - interval '9 days' + n * interval '1 second',"
                         " CASE WHEN n % 4 = 0 THEN now() - interval '1 hour'"
                         " ELSE now() - interval '9 days' + n * interval '2 second' END"
                         " FROM generate_series(1, 20000) AS n")
    cutoff = datetime.now(timezone.utc) - timedelta(days=7)

    engine, statements = _engine_noting_its_statements(url)
    try:
        with Session(engine) as session:
            assert prune_handled_messages(session, cutoff, 1000) == 1000
            session.rollback()
        [plan] = _plans(engine, statements, explain="EXPLAIN (ANALYZE, COSTS OFF)")
        assert "Index Scan using ix_inbox_messages_handled_at" in plan, plan
        assert "Rows Removed by Filter" not in plan and "Seq Scan" not in plan, plan
        with Session(engine) as session:
            pruned = [prune_handled_messages(session, cutoff, 10_000) for _ in range(3)]
            session.commit()
    finally:
        engine.dispose()
    assert pruned == [10_000, 5000, 0]
    assert _scalar(url, "SELECT count(*) FROM inbox_messages") == 5000
    assert _scalar(url, "SELECT min(processed_at) > now() - interval '2 hours'"
                        " FROM inbox_messages")


@pytest.mark.parametrize("service", SERVICES)
def test_the_value_digests_revision_whose_index_build_failed_runs_again(infrastructure, service):
    """The value digest's revision adds its column, commits it, then builds its index outside
    any transaction: a build that failed leaves the column behind, unstamped, and an invalid
    index of the name (here a unique build on handling times two rows share), and the revision
    runs again, whole."""
    url = _database_url(infrastructure, "failed-digest-build", service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, BELOW_THE_VALUE_DIGEST[service])
    connection = psycopg2.connect(driver_dsn(url))
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE inbox_messages ADD COLUMN value_digest bytea")
        cursor.execute("INSERT INTO inbox_messages (message_id, topic, partition, \"offset\","
                       " processed_at) SELECT gen_random_uuid(), 'topic', 0, n,"
                       " '2026-01-01T00:00:00Z' FROM generate_series(1, 2) AS n")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cursor.execute("CREATE UNIQUE INDEX CONCURRENTLY ix_inbox_messages_handled_at"
                           " ON inbox_messages (processed_at) WHERE processed_at IS NOT NULL")
    connection.close()
    assert _index_valid(url, "ix_inbox_messages_handled_at") is False
    command.upgrade(config, "head")
    assert _index_valid(url, "ix_inbox_messages_handled_at")
    assert _index_valid(url, "ix_inbox_messages_handled") is None
    script_head = ScriptDirectory.from_config(config).get_current_head()
    assert _scalar(url, "SELECT version_num FROM alembic_version") == script_head


# Each service's revision that keeps inbox messages' envelope versions, and the one below it.
THE_ENVELOPE_VERSION = {"orders": "0014", "payments": "0014", "gateway": "0015"}
BELOW_THE_ENVELOPE_VERSION = {"orders": "0013", "payments": "0013", "gateway": "0014"}


@pytest.mark.parametrize("service", SERVICES)
def test_inbox_rows_keep_their_envelope_version_those_of_before_version_1(infrastructure,
                                                                            service):
    """Every inbox keeps its messages' envelope version (orders' and payments' revision 0014, the
    gateway's 0015): the rows stored before, and those the release before goes on storing
    without it, are of version 1; the downgrade drops the column."""
    url, config, inbox_before = _inbox_rows_stored_either_side_of(
        infrastructure, "envelope-version", service, BELOW_THE_ENVELOPE_VERSION[service])
    assert _scalar(url, "SELECT array_agg(DISTINCT envelope_version) FROM inbox_messages") == [1]
    assert _scalar(url, "SELECT count(*) FROM inbox_messages") == 2
    _assert_going_down_leaves_the_inbox_as_it_was(url, config,
                                                  BELOW_THE_ENVELOPE_VERSION[service], inbox_before)


@pytest.mark.parametrize("service", SERVICES)
def test_the_envelope_versions_downgrade_waits_for_the_messages_the_release_before_would_misread(
        infrastructure, service):
    """The release before reads every message as version 1. A message of version 2 holding its
    payload (parked for its type, say, by a release that knew the version) would go to its handler
    so, after a replay, and the downgrade would have the column say 1 of it once made again: it
    is refused, in one line, nothing changed, until the message is handled or given up on. A
    message kept as its text, its version unknown as it came, holds no payload: that release
    leaves it parked, and it does not hold the downgrade up."""
    url = _database_url(infrastructure, "envelope-version-down", service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "head")
    before = BELOW_THE_ENVELOPE_VERSION[service]
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO inbox_messages (message_id, topic, partition, \"offset\", type,"
            " envelope_version, payload, raw_value, parked_at) VALUES"
            " ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic', 0, 0, 'PaymentRefunded', 2,"
            "  '{}', NULL, now()),"
            " ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a12', 'topic', 0, 1, 'PaymentRequested', 2,"
            "  NULL, '{\"version\": 2}', now())")
    connection.close()
    schema = _schema(url)

    migrating = _migrate_by_hand(service, url, "downgrade", service, before)
    assert migrating.returncode == 1, migrating.stderr
    errors = [line for line in migrating.stderr.splitlines()
              if line.startswith(("ERROR", "WARNING", "Traceback"))]
    assert len(errors) == 1 and errors[0].startswith("ERROR"), migrating.stderr
    assert ("1 inbox message(s) of an envelope version other than 1 await handling or lie parked"
            " with their payload") in errors[0]
    # The way out, in commands to run, the shop stopped before the downgrade (as the parking's):
    # a replay, for this release to handle the message (a discard leaves undone what it was to do).
    assert f"python -m tasks.parked replay {service} ID [ID ...], or --all" in errors[0]
    assert f"python -m tasks.parked list {service}` shows them" in errors[0]
    assert "only if it is garbage" in errors[0]
    assert "Then stop the shop and downgrade again; nothing was downgraded" in errors[0]
    assert _schema(url) == schema

    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("UPDATE inbox_messages SET parked_at = NULL, processed_at = now()"
                       " WHERE payload IS NOT NULL")  # (given up on: discarded)
    connection.close()
    migrating = _migrate_by_hand(service, url, "downgrade", service, before)
    assert migrating.returncode == 0, migrating.stderr
    assert _scalar(url, "SELECT count(*) FROM inbox_messages WHERE raw_value IS NOT NULL") == 1
    command.upgrade(config, "head")


# A later release's revision, above this release's head (a column of its own, dropped going down).
LATER_REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "{later}"
down_revision = "{head}"


def upgrade() -> None:
    op.add_column("outbox_messages", sa.Column("later_release", sa.Text))


def downgrade() -> None:
    op.drop_column("outbox_messages", "later_release")
'''


@pytest.mark.parametrize("service", SERVICES)
def test_a_downgrade_through_the_envelope_version_is_refused_before_any_revision_goes_down(
        infrastructure, service, monkeypatch, tmp_path):
    """A downgrade through the envelope_version revision goes down through the revisions above
    it first (a later release's, and this one's), each committed as it goes. Refused only in the
    envelope_version revision's own step, it left those gone down; it is refused before any
    revision goes down, the database left at the later release's head with its schema. (Here the
    later release is this one's revisions and one more, the test's.)"""
    import shared.migrations

    migrations = tmp_path / f"{service}_app" / "migrations"
    shutil.copytree(shared.migrations.REPO_ROOT / f"{service}_app" / "migrations", migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    url = _database_url(infrastructure, "envelope-version-later", service)
    head = ScriptDirectory.from_config(alembic_config(service, url)).get_current_head()
    later = f"{int(head) + 1:04d}"
    (migrations / "versions" / f"{later}_later_release.py").write_text(
        LATER_REVISION.format(later=later, head=head))
    monkeypatch.setattr(shared.migrations, "REPO_ROOT", tmp_path)
    settings = load_settings({f"{service.upper()}_DATABASE_URL": url})
    monkeypatch.setattr(shared.migrations, "get_settings", lambda: settings)
    # (By alembic alone: at the test's head, the schema is not the one the models declare, which
    # `upgrade` would refuse.)
    ensure_database(url)
    command.upgrade(alembic_config(service, url), "head")
    _park_a_version_2_message_with_its_payload(url)
    schema = _schema(url)

    before = BELOW_THE_ENVELOPE_VERSION[service]
    with pytest.raises(DowngradeRefused) as refused:
        downgrade(service, before)
    assert str(refused.value).startswith("1 inbox message(s) of an envelope version other than 1")
    assert str(refused.value).endswith("nothing was downgraded")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later
    assert _schema(url) == schema


@pytest.mark.parametrize("service", SERVICES)
def test_the_envelope_versions_own_step_refuses_under_its_lock_what_was_asked_before(
        infrastructure, service):
    """The envelope_version revision's own downgrade step asks again, under the inbox's lock,
    what shared.migrations asks before any revision goes down (a message might be stored in
    between): run by alembic alone, without that first question, the step refuses, and its
    revision stays, the inbox as it was."""
    url = _database_url(infrastructure, "envelope-version-step", service)
    ensure_database(url)
    config = alembic_config(service, url)
    envelope_version = THE_ENVELOPE_VERSION[service]
    command.upgrade(config, envelope_version)
    _park_a_version_2_message_with_its_payload(url)
    schema = _schema(url)

    _assert_its_step_refuses(
        config, url, BELOW_THE_ENVELOPE_VERSION[service], stays_at=envelope_version, schema=schema,
        begins="1 inbox message(s) of an envelope version other than 1",
        ends="the database stays at the revision that keeps envelope versions, with the messages"
             " as they were", service=service, way_out="replay")


def _assert_its_step_refuses(config, url: str, before: str, stays_at: str, schema, begins: str,
                             ends: str, service: str, way_out: str = "discard") -> None:
    """A downgrade to `before` run by alembic alone (no question asked before any revision goes
    down) is refused by a revision's own step, in words that begin and end so, naming the
    service's commands (it said `discard SERVICE`; `way_out` is the one it names), the database
    left at `stays_at` with its `schema`."""
    with pytest.raises(DowngradeRefused) as refused:
        command.downgrade(config, before)
    assert str(refused.value).startswith(begins)
    assert str(refused.value).endswith(ends)
    assert f"python -m tasks.parked {way_out} {service} " in str(refused.value)
    assert "SERVICE" not in str(refused.value)
    assert _scalar(url, "SELECT version_num FROM alembic_version") == stays_at
    assert _schema(url) == schema


# Each service's revision that parks outbox rows (parked_at), and the one below it.
OUTBOX_PARKING = {"orders": ("0008", "0007"), "payments": ("0008", "0007"),
                  "gateway": ("0007", "0006")}


@pytest.mark.parametrize("service", SERVICES)
def test_the_outbox_parkings_downgrade_waits_for_the_parked_rows_the_release_before_would_retry(
        infrastructure, service):
    """The release before outbox parking parks nothing and reads the outbox oldest first: a row
    parked as too large ever to be sent would be tried at every wake-up, the rows of its topic and
    key held behind it (and, once they fill a batch, every row), and nothing would say it was
    parked. A downgrade through the parking revision is refused, in one line, while a row lies
    parked, before any revision goes down: the database left as it was, at its head with its
    rows (the revisions above the parking one went down, each committed, before it refused), and
    the way out said is to discard the row (a replay, the shop stopped, would only clear its
    park); once it is given up on, the downgrade goes through."""
    url = _database_url(infrastructure, "outbox-parking-down", service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "head")
    parking, before = OUTBOX_PARKING[service]
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
            " last_error, parked_at) VALUES ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic',"
            " 'u-1', 'PaymentRequested', '{}', 1, 'too large', now()),"
            " ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a12', 'topic', 'u-1', 'PaymentRequested', '{}',"
            " 0, NULL, NULL)")
    connection.close()
    head, schema = _scalar(url, "SELECT version_num FROM alembic_version"), _schema(url)

    migrating = _migrate_by_hand(service, url, "downgrade", service, before)
    assert migrating.returncode == 1, migrating.stderr
    errors = [line for line in migrating.stderr.splitlines()
              if line.startswith(("ERROR", "WARNING", "Traceback"))]
    assert len(errors) == 1 and errors[0].startswith("ERROR"), migrating.stderr
    assert "1 outbox row(s) lie parked" in errors[0]
    assert (f"(python -m tasks.parked discard {service} --outbox --all; `list {service} --outbox`"
            " shows them)") in errors[0] and "nothing was downgraded" in errors[0]
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head != parking
    assert _schema(url) == schema
    assert _scalar(url, "SELECT count(*) FROM outbox_messages WHERE parked_at IS NOT NULL") == 1

    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("DELETE FROM outbox_messages WHERE parked_at IS NOT NULL")  # (discarded)
    connection.close()
    migrating = _migrate_by_hand(service, url, "downgrade", service, before)
    assert migrating.returncode == 0, migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == before
    assert _scalar(url, "SELECT count(*) FROM outbox_messages") == 1
    command.upgrade(config, "head")


@pytest.mark.parametrize("service", SERVICES)
def test_the_outbox_parkings_own_step_refuses_under_its_lock_what_was_asked_before(
        infrastructure, service):
    """The parking revision's own downgrade step asks again, under the outbox's lock, what
    shared.migrations asks before any revision goes down (a row might be parked in between): run
    by alembic alone, without that first question, the step refuses, and its revision stays, the
    outbox as it was."""
    url = _database_url(infrastructure, "outbox-parking-step", service)
    ensure_database(url)
    config = alembic_config(service, url)
    parking, before = OUTBOX_PARKING[service]
    command.upgrade(config, parking)
    _park_an_outbox_row(url)
    schema = _schema(url)

    _assert_its_step_refuses(
        config, url, before, stays_at=parking, schema=schema,
        begins="1 outbox row(s) lie parked",
        ends="the database stays at the revision that parks rows, with the rows as they were",
        service=service)
    assert _scalar(url, "SELECT count(*) FROM outbox_messages WHERE parked_at IS NOT NULL") == 1


# A first answer as the release before kept it, in jsonb only (every service's).
ANSWER_KEPT_AS_JSONB = {"id": "6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11", "user_id": "u-1",
                        "amount": "10.50", "description": "caf\u00e9 \u2713", "reason": None,
                        "created_at": "2026-11-26T12:00:00.500000+00:00"}


@pytest.mark.parametrize("service", SERVICES_KEEPING_IDEMPOTENCY_KEYS)
def test_idempotent_answers_kept_as_jsonb_stay_through_the_text_column_and_back(infrastructure,
                                                                               service):
    """Revision 0012 (every service's; the gateway's table, never written to, is dropped after
    it) adds the column of the answers' texts beside their jsonb, which a key kept before keeps,
    and is then as the service's models say; the downgrade drops that column, the jsonb kept."""
    url = _database_url(infrastructure, "answers-as-written", service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "0011")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("INSERT INTO idempotency_keys (user_id, endpoint, key, request_hash,"
                       " response_status, response_body) VALUES ('u-1', 'POST /orders', 'k-1',"
                       " 'hash', 202, %s)", (json.dumps(ANSWER_KEPT_AS_JSONB),))
    connection.close()

    command.upgrade(config, "head")
    assert _answer_kept(url, "response_text") is None
    assert _answer_kept(url, "response_body") == ANSWER_KEPT_AS_JSONB
    assert _drift(service, url) == []
    command.downgrade(config, "0011")
    assert _answer_kept(url, "response_body") == ANSWER_KEPT_AS_JSONB
    with pytest.raises(psycopg2.errors.UndefinedColumn):
        _answer_kept(url, "response_text")
    command.upgrade(config, "head")


def _answer_kept(url: str, column: str):
    """The one idempotency key's `column`, as psycopg2 reads it."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM idempotency_keys")
        (row,) = cursor.fetchall()
    connection.close()
    return row[0]


def _drift(service: str, url: str) -> list:
    """What shared.schema_drift finds between the database at `url`, migrated, and the service's
    models: nothing, when its migrations and its models agree."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return schema_drift(service, connection)
    finally:
        engine.dispose()


def _table_exists(url: str, name: str) -> bool:
    return _scalar(url, "SELECT to_regclass(%s) IS NOT NULL", name)


def _scalar(url: str, query: str, *parameters):
    """The one value `query` answers in the database at `url` (None for no row)."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(query, parameters)
        row = cursor.fetchone()
    connection.close()
    return row and row[0]


def _read(url: str, column: str) -> dict:
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM outbox_messages")
        (value,) = cursor.fetchone()
    connection.close()
    return json.loads(value)


def _database_url(infrastructure, layer: str, service: str) -> str:
    return (f"{infrastructure.postgres_base}/{database_name(layer, service)}"
            .replace("postgresql://", "postgresql+psycopg2://"))


def _inbox_row(cursor) -> None:
    cursor.execute("INSERT INTO inbox_messages (message_id, topic, partition, \"offset\")"
                   " VALUES (gen_random_uuid(), 'topic', 0, 0)")


def _inbox_rows_stored_either_side_of(infrastructure, label: str, service: str,
                                      before: str) -> tuple[str, Config, dict[str, list]]:
    """A database of `service`'s migrated to `before`, an inbox row stored, then to the head,
    another stored as the release before stores it (naming only the columns it knows): its URL,
    its alembic config, and the inbox's definition at `before`."""
    url = _database_url(infrastructure, label, service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, before)
    inbox_before = _table_definition(url, "inbox_messages")
    _store_an_inbox_row(url)
    command.upgrade(config, "head")
    _store_an_inbox_row(url)  # as the release before stores it
    return url, config, inbox_before


def _the_one_error_line(migrating: subprocess.CompletedProcess) -> str:
    """The one line a migration refused with (exit 1, every other line INFO)."""
    assert migrating.returncode == 1, migrating.stderr
    errors = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert len(errors) == 1 and errors[0].startswith("ERROR"), migrating.stderr
    return errors[0]


def _engine_noting_its_statements(url: str) -> tuple[sa.Engine, list[tuple[str, object]]]:
    """An engine for `url`, and the list each statement it runs goes into with its parameters
    (for a test to EXPLAIN)."""
    engine = sa.create_engine(url)
    statements = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, context, many:
                    statements.append((statement, parameters)))
    return engine, statements


def _migrated_to_its_head(infrastructure, layer: str, service: str) -> tuple[str, Config]:
    """A database of `service`'s for the layer, migrated to the head: its URL and alembic
    config."""
    url = _database_url(infrastructure, layer, service)
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "head")
    return url, config


def _filled_and_analysed(url: str, table: str, *statements: str) -> None:
    """`statements` run on the database (filling `table`), then `table` analysed, so that the
    planner plans for the rows as they are."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(f"ANALYZE {table}")
    connection.close()


def _plans(engine: sa.Engine, statements: list[tuple[str, object]],
           explain: str = "EXPLAIN") -> list[str]:
    """The plan of each of the statements `engine` ran (_engine_noting_its_statements), as
    `explain` shows it; what an EXPLAIN ANALYZE did is rolled back."""
    ran = list(statements)  # (not those that explain them)
    with engine.connect() as connection:
        plans = ["\n".join(connection.exec_driver_sql(f"{explain} {statement}", parameters)
                           .scalars())
                 for statement, parameters in ran]
        connection.rollback()
    return plans


def _store_an_inbox_row(url: str) -> None:
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        _inbox_row(cursor)
    connection.close()


def _assert_going_down_leaves_the_inbox_as_it_was(url: str, config: Config, before: str,
                                                  inbox_before: dict[str, list]) -> None:
    """The downgrade to `before` leaves the inbox as it was defined there; then up again."""
    command.downgrade(config, before)
    assert _table_definition(url, "inbox_messages") == inbox_before
    command.upgrade(config, "head")


def _park_a_version_2_message_with_its_payload(url: str) -> None:
    """An inbox message of envelope version 2, parked with its payload (by a release that knew
    the version): one the release before the envelope_version revision would misread."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO inbox_messages (message_id, topic, partition, \"offset\", type,"
            " envelope_version, payload, parked_at) VALUES"
            " ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic', 0, 0, 'PaymentRefunded', 2,"
            "  '{}', now())")
    connection.close()


def _park_an_outbox_row(url: str) -> None:
    """An outbox row parked as too large ever to be sent."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
            " last_error, parked_at) VALUES ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic',"
            " 'u-1', 'PaymentRequested', '{}', 1, 'too large', now())")
    connection.close()


def _table_definition(url: str, table: str) -> dict[str, list]:
    """`table` as PostgreSQL's catalog has it: its columns in order (type, NOT NULL, default),
    its constraints and its indexes, each with its name and definition."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("""
SELECT attname, format_type(atttypid, atttypmod), attnotnull, pg_get_expr(adbin, adrelid)
FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
                       (table,))
        columns = cursor.fetchall()
        cursor.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                       " WHERE conrelid = to_regclass(%s) ORDER BY conname", (table,))
        constraints = cursor.fetchall()
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s"
                       " ORDER BY indexname", (table,))
        indexes = cursor.fetchall()
    connection.close()
    return {"columns": columns, "constraints": constraints, "indexes": indexes}


def _index_valid(url: str, name: str) -> bool | None:
    return _scalar(url, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", name)


def test_the_inbox_index_is_built_while_the_consumers_go_on_storing(infrastructure):
    """Revision 0007 indexes the inbox, the biggest table, CONCURRENTLY: a consumer's insert
    made while the build waits for a transaction that was open on the table when it began goes
    through, where a plain CREATE INDEX would hold it until that transaction ended."""
    url = _database_url(infrastructure, "concurrent-index", "orders")
    ensure_database(url)
    config = alembic_config("orders", url)
    command.upgrade(config, "0006")
    dsn = driver_dsn(url)
    storing = psycopg2.connect(dsn)  # a consumer's transaction, open as the build begins
    failures = []

    def upgrade() -> None:
        try:
            command.upgrade(config, "0007")
        except Exception as exc:
            failures.append(exc)

    upgrading = threading.Thread(target=upgrade, daemon=True)
    watcher = psycopg2.connect(dsn)
    watcher.autocommit = True  # (a transaction would see pg_stat_activity frozen)
    try:
        with storing.cursor() as cursor:
            _inbox_row(cursor)
        upgrading.start()
        with watcher.cursor() as cursor:
            def build_waiting() -> bool:
                return other_sessions(cursor, "query LIKE 'CREATE INDEX CONCURRENTLY%%'"
                                               " AND wait_event = 'virtualxid'") == 1

            wait_for(build_waiting, timeout=20, what="the index build to wait for the consumer")
            cursor.execute("SET lock_timeout = '3s'")
            _inbox_row(cursor)  # another consumer storing: not held up by the build

            def build_waited_past_the_migrations_lock_timeout() -> bool:
                # (a lock wait the migration's limit would have cut short, the index left invalid)
                return other_sessions(cursor, "wait_event = 'virtualxid' AND clock_timestamp()"
                                               " - query_start > %s::interval",
                                       PAST_A_MIGRATIONS_LOCK_WAIT) == 1

            wait_for(build_waited_past_the_migrations_lock_timeout, timeout=20,
                     what="the index build to wait past the migration's lock timeout")
    finally:
        watcher.close()
        storing.commit()
        storing.close()
        upgrading.join(30)
    assert not upgrading.is_alive() and failures == []
    assert _index_valid(url, "ix_inbox_messages_handled")


def test_a_revision_held_up_by_the_shop_gives_way_and_runs_once_the_lock_is_free(infrastructure):
    """Revision 0008 alters the outbox, which a transaction of the shop has read and holds open.
    Queued for its lock, the ALTER would hold up every later statement on the outbox for as long as
    that transaction lasts; it gives way after the migration's lock timeout, shorter than the
    shop's, so a relay reading the outbox meanwhile gets through, and the revision is tried again
    until the lock is free."""
    assert _seconds(MIGRATION_LIMITS["lock_timeout"]) < _seconds(SESSION_LIMITS["lock_timeout"])
    url = _database_url(infrastructure, "giving-way", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "0007")
    env = {**os.environ, "ORDERS_DATABASE_URL": url.replace("+psycopg2", "")}
    dsn = driver_dsn(url)
    holder, reader = psycopg2.connect(dsn), psycopg2.connect(dsn)
    reader.autocommit = True
    upgrading = None
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM outbox_messages")
        upgrading = start_child(
            [sys.executable, "-m", "shared.migrations", "upgrade", "orders"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with reader.cursor() as cursor:
            def alter_waiting() -> bool:
                return other_sessions(cursor, "query LIKE 'ALTER TABLE outbox_messages%%'"
                                               " AND wait_event_type = 'Lock'") == 1

            wait_for(alter_waiting, timeout=30, what="the revision to wait for the outbox's lock")
            # A relay's read, under the shop's own lock limit: through once the ALTER gives way.
            cursor.execute("SELECT count(*) FROM outbox_messages")
            wait_for(alter_waiting, timeout=30, what="the revision to try again")
        holder.commit()
        output = upgrading.communicate(timeout=60)[0]
    finally:
        holder.close()
        reader.close()
        if upgrading is not None:
            upgrading.kill()
            upgrading.wait()
    assert upgrading.returncode == 0, output
    assert "gave way" in output and "Running upgrade 0007 -> 0008" in output, output
    assert _index_valid(url, "ix_outbox_messages_refused")


def test_an_index_build_left_invalid_is_built_anew_when_the_revision_runs_again(infrastructure):
    url = _database_url(infrastructure, "invalid-index", "payments")
    ensure_database(url)
    config = alembic_config("payments", url)
    command.upgrade(config, "0007")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        # what a CREATE INDEX CONCURRENTLY that failed part way leaves behind
        cursor.execute("UPDATE pg_index SET indisvalid = false"
                       " WHERE indexrelid = 'ix_inbox_messages_handled'::regclass")
        cursor.execute("UPDATE alembic_version SET version_num = '0006'")
    connection.close()
    assert _index_valid(url, "ix_inbox_messages_handled") is False
    command.upgrade(config, "0007")
    assert _index_valid(url, "ix_inbox_messages_handled")
    command.downgrade(config, "0006")
    assert _index_valid(url, "ix_inbox_messages_handled") is None
    command.upgrade(config, "head")


def test_processes_upgrading_one_database_at_once_take_turns(infrastructure):
    """As replicas starting together do: one migrates while the others wait for its lock, then
    find nothing left to do. The waiters must hold no snapshot while they wait: an index built
    CONCURRENTLY waits for every older one to end (a waiter blocked in pg_advisory_lock was
    found dead-locked with the holder)."""
    url = _database_url(infrastructure, "upgrading-at-once", "orders")
    ensure_database(url)
    env = {**os.environ, "ORDERS_DATABASE_URL": url.replace("+psycopg2", "")}
    holder = psycopg2.connect(driver_dsn(url))
    holder.autocommit = True
    upgrading = []
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            upgrading.extend(start_child(
                [sys.executable, "-m", "shared.migrations", "upgrade", "orders"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3))

            def all_waiting() -> bool:  # in the lock, or between two tries (its last: COMMIT)
                return other_sessions(cursor, "backend_type = 'client backend' AND (query LIKE"
                                               " '%%advisory_lock%%' OR query = 'COMMIT')") == 3

            wait_for(all_waiting, timeout=30, what="three processes waiting for the lock")
            # A transaction begun after their tries: an index build waits for any snapshot
            # older than its own, which a waiter blocked in pg_advisory_lock would hold.
            cursor.execute("SELECT txid_current()")
            cursor.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        outputs = [process.communicate(timeout=60)[0] for process in upgrading]
    finally:
        holder.close()
        for process in upgrading:
            process.kill()
            process.wait()
    assert [process.returncode for process in upgrading] == [0, 0, 0], outputs
    assert sum("Running upgrade 0007 -> 0008" in output for output in outputs) == 1, outputs


def test_a_revision_whose_index_build_failed_runs_again(infrastructure):
    """Revision 0011 adds a column, commits it, then builds its index outside any transaction
    (and drops the one it replaces, 0008's): a build that failed leaves the column behind,
    unstamped, and the revision must run again."""
    url = _database_url(infrastructure, "failed-build", "orders")
    ensure_database(url)
    config = alembic_config("orders", url)
    command.upgrade(config, "0010")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("ALTER TABLE outbox_messages ADD COLUMN next_attempt_at timestamptz")
    connection.close()
    command.upgrade(config, "head")
    assert _index_valid(url, "ix_outbox_messages_refused")
    assert _index_valid(url, "ix_outbox_messages_parked") is None


def test_a_downgrade_that_fails_leaves_its_revision_whole(infrastructure):
    """A revision's downgrade runs in one transaction with its version: one that fails (here the
    version row is held by another session past the downgrade's lock timeout) leaves the
    revision's index, as the version still says: 0008's (with its column), then 0007's."""
    url = _database_url(infrastructure, "failed-downgrade", "orders")
    ensure_database(url)
    config = alembic_config("orders", url)
    command.upgrade(config, "head")
    for revision, below, index in (("0008", "0007", "ix_outbox_messages_parked"),
                                   ("0007", "0006", "ix_inbox_messages_handled")):
        command.downgrade(config, revision)  # (to the revision: undoing those above it)
        holder = psycopg2.connect(driver_dsn(url))
        try:
            with holder.cursor() as cursor:
                cursor.execute("SELECT * FROM alembic_version FOR UPDATE")
            with pytest.raises(Exception, match="lock timeout"):  # (MIGRATION_LIMITS)
                command.downgrade(config, below)
        finally:
            holder.rollback()
            holder.close()
        assert _index_valid(url, index), revision


def test_upgrade_refuses_a_postgresql_older_than_the_shop_runs_on(infrastructure, monkeypatch):
    """The relay leader needs PostgreSQL 14 (`idle_session_timeout`): on an older server `upgrade`
    stops before any revision, naming the version, where the shop would otherwise start and never
    relay an order. (Here the minimum is put just above the test server's version.)"""
    import shared.migrations

    url = _database_url(infrastructure, "too-old", "orders")
    settings = load_settings({"ORDERS_DATABASE_URL": url})
    with psycopg2.connect(driver_dsn(url.rsplit("/", 1)[0] + "/postgres")) as connection:
        version = connection.server_version
    connection.close()
    monkeypatch.setattr(shared.migrations, "get_settings", lambda: settings)
    monkeypatch.setattr(shared.migrations, "MINIMUM_SERVER_VERSION_NUM", version + 1)
    with pytest.raises(ServerTooOld, match=r"PostgreSQL \d+ or later is needed; this server is"):
        upgrade("orders")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('alembic_version')")
        assert cursor.fetchone() == (None,)  # no revision ran
    connection.close()

    monkeypatch.setattr(shared.migrations, "MINIMUM_SERVER_VERSION_NUM", version)
    upgrade("orders")
    assert _index_valid(url, "ix_outbox_messages_refused")


@pytest.mark.parametrize("service", SERVICES)
def test_an_upgrade_and_a_downgrade_by_hand_say_each_revision_once_in_a_line(infrastructure,
                                                                             service):
    """Each revision the command runs is said in a line of its own, with the first paragraph of
    its docstring: alembic wrote the paragraph as its file wraps it, the lines after the first
    with no level or name (lines of their own to a reader, or to a log's collector), and said
    "Context impl PostgresqlImpl." and "Will assume transactional DDL." three times over."""
    url = _database_url(infrastructure, "said-once", service)
    script = ScriptDirectory.from_config(alembic_config(service, url))
    revisions = list(reversed(list(script.walk_revisions())))  # (the first first)
    for arguments, going in [(("upgrade", service), revisions),
                             (("downgrade", service, revisions[-3].revision),
                              list(reversed(revisions[-2:])))]:
        migrating = _migrate_by_hand(service, url, *arguments)
        assert migrating.returncode == 0, migrating.stderr
        lines = migrating.stderr.splitlines()
        said = [line for line in lines if line.startswith("INFO alembic.runtime.migration: ")]
        assert lines == [line for line in lines if line.startswith("INFO shared.migrations: ")
                         ] + said, migrating.stderr
        action = arguments[0]
        assert said == [
            f"INFO alembic.runtime.migration: Running {action}"
            f" {(revision.down_revision or 'base') if action == 'upgrade' else revision.revision}"
            f" -> {revision.revision if action == 'upgrade' else revision.down_revision}:"
            f" {' '.join(revision.doc.split())}" for revision in going]


def test_an_upgrade_or_a_downgrade_with_nothing_to_do_says_so_in_a_line(infrastructure):
    """With no revision to run, alembic says nothing (its lines of context not shown), and the
    command said nothing at all."""
    url = _database_url(infrastructure, "nothing-to-do", "orders")
    script = ScriptDirectory.from_config(alembic_config("orders", url))
    head = script.get_current_head()
    below = script.get_revision(head).down_revision
    for arguments, said in [
            (("upgrade", "orders"), None),
            (("upgrade", "orders"), f"{head} already, this release's head"),
            (("upgrade", "orders", head), f"{head} already, this release's head"),
            (("downgrade", "orders", below), None),
            (("downgrade", "orders", below), f"{below} already")]:
        migrating = _migrate_by_hand("orders", url, *arguments)
        assert migrating.returncode == 0, migrating.stderr
        nothing_to_do = [line for line in migrating.stderr.splitlines()
                         if "nothing to do" in line]
        if said is None:  # (revisions ran)
            assert nothing_to_do == [], migrating.stderr
        else:
            assert migrating.stderr.splitlines() == [
                f"INFO shared.migrations: orders: the database is at {said}: nothing to do"]


def _migrate_by_hand(service: str, url: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m shared.migrations <arguments>` for the service's database at `url`, as its
    `*-migrate` container runs it."""
    env = {**os.environ, f"{service.upper()}_DATABASE_URL": url.replace("+psycopg2", "")}
    return subprocess.run([sys.executable, "-m", "shared.migrations", *arguments], env=env,
                          capture_output=True, text=True, timeout=120)


def _spelt(target: str) -> str:
    """A revision target spelt for a database's name (a case's own database)."""
    return target.replace("+", "plus").replace("-", "minus").replace("@", "at")


def _schema(url: str) -> dict[str, dict]:
    """Every table of the database's, as _table_definition reads it."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = sorted(table for (table,) in cursor.fetchall())
    connection.close()
    return {table: _table_definition(url, table) for table in tables}


# A revision's work undone by hand, its revision kept: as a database migrated by a revision before
# it was edited is (the gateway's 0011 gained users.token_generation afterwards, orders' and
# payments' 0012 was swapped for another), and what `upgrade` names of it.
DRIFTED = {
    "orders": (["ALTER TABLE idempotency_keys DROP COLUMN response_text"],
               "column idempotency_keys.response_text missing"),
    "payments": (["DROP INDEX ix_inbox_messages_parked",
                  "ALTER TABLE accounts ALTER COLUMN balance TYPE numeric(20, 4)"],
                 "column accounts.balance's type is NUMERIC(20, 4), declared NUMERIC(17, 2);"
                 " index ix_inbox_messages_parked on inbox_messages missing"),
    "gateway": (["ALTER TABLE users DROP COLUMN token_generation"],
                "column users.token_generation missing"),
}


@pytest.mark.parametrize("service", SERVICES)
def test_an_upgrade_refuses_a_database_at_its_head_whose_schema_its_revisions_do_not_make(
        infrastructure, service):
    """A database that records this release's head and has another schema (migrated by a
    revision edited since) is refused in one line naming each difference, exit 1, where
    `upgrade` said "nothing to do" and the services failed at run time (500 UndefinedColumn on
    register and login). Its version and schema are left as they are."""
    url = _database_url(infrastructure, "drifted", service)
    statements, named = DRIFTED[service]
    head = _migrated_then_changed_by_hand(service, url, "head", statements)
    schema = _schema(url)

    migrating = _migrate_by_hand(service, url, "upgrade", service)
    assert _the_one_error_line(migrating).startswith(
        f"ERROR shared.migrations: the {service} database is at revision {head}, this release's"
        f" head, but its schema is not the one this release's revisions make: {named}. It was"
        " migrated by a revision edited since")
    assert "nothing to do" not in migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head
    assert _schema(url) == schema


@pytest.mark.parametrize("service", SERVICES)
def test_what_a_database_at_its_head_has_that_no_revision_makes_is_warned_of_not_refused(
        infrastructure, service):
    """An index, a column or a table added by hand (a DBA's index, say) keeps no service from
    starting: `upgrade` names them in a WARNING and has nothing to do, the database left as it
    is."""
    url = _database_url(infrastructure, "added-to", service)
    head = _migrated_then_changed_by_hand(service, url, "head", [
        "CREATE INDEX ix_by_hand ON inbox_messages (received_at)",
        "ALTER TABLE inbox_messages ADD COLUMN noted text",
        "CREATE TABLE reports_by_hand (id int)"])
    schema = _schema(url)

    migrating = _migrate_by_hand(service, url, "upgrade", service)
    assert migrating.returncode == 0, migrating.stderr
    assert migrating.stderr.splitlines() == [
        f"WARNING shared.migrations: {service}: the database has what this release's revisions"
        " do not make: table reports_by_hand not declared; index ix_by_hand on inbox_messages"
        " not declared; column inbox_messages.noted not declared (added by hand, say: left as it"
        " is)",
        f"INFO shared.migrations: {service}: the database is at {head} already, this release's"
        " head: nothing to do"]
    assert _schema(url) == schema


@pytest.mark.parametrize("service", SERVICES)
def test_what_a_database_at_its_head_has_that_writes_can_trip_over_is_refused(infrastructure,
                                                                              service):
    """A unique index, or a column that needs a value, that no revision makes (left by a revision
    edited since, say): every insert might fail on it, so it is refused as a missing column is,
    not only warned of."""
    url = _database_url(infrastructure, "added-in-the-way", service)
    head = _migrated_then_changed_by_hand(service, url, "head", [
        "CREATE UNIQUE INDEX ix_unique_by_hand ON inbox_messages (received_at)",
        "ALTER TABLE inbox_messages ADD COLUMN needed text NOT NULL DEFAULT 'x'",
        "ALTER TABLE inbox_messages ALTER COLUMN needed DROP DEFAULT"])

    migrating = _migrate_by_hand(service, url, "upgrade", service)
    assert _the_one_error_line(migrating).startswith(
        f"ERROR shared.migrations: the {service} database is at revision {head}, this release's"
        " head, but its schema is not the one this release's revisions make: index"
        " ix_unique_by_hand on inbox_messages not declared; column inbox_messages.needed not"
        " declared. It was migrated by a revision edited since")


def test_an_index_of_an_expression_other_than_the_declared_one_in_case_alone_is_refused(
        infrastructure):
    """The username key's index, made by a revision edited since to fold usernames to upper case
    (its letters swapped), would find nobody signing in: refused at the head, naming the two
    expressions, though they differ only in their letters' case (Alembic's comparison lowers
    both)."""
    url = _database_url(infrastructure, "drifted-expression", "gateway")
    upper, lower = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
    head = _migrated_then_changed_by_hand("gateway", url, "head", [
        f"DROP INDEX {USERNAME_KEY_INDEX}",
        f"CREATE UNIQUE INDEX {USERNAME_KEY_INDEX} ON users"
        f" (translate(username, '{lower}', '{upper}'))"])

    migrating = _migrate_by_hand("gateway", url, "upgrade", "gateway")
    assert _the_one_error_line(migrating).startswith(
        f"ERROR shared.migrations: the gateway database is at revision {head}, this release's"
        " head, but its schema is not the one this release's revisions make: index"
        f" {USERNAME_KEY_INDEX} on users is of translate((username)::text, '{lower}'::text,"
        f" '{upper}'::text), declared of translate(username, '{upper}', '{lower}'). It was"
        " migrated by a revision edited since")


def test_an_upgrade_that_runs_revisions_refuses_the_schema_an_edited_revision_left_below_them(
        infrastructure):
    """A database migrated by a revision edited since is refused by the upgrade that takes it on
    to the head as well: the revisions run, it stays drifted (the gateway's 0011, before
    users.token_generation, and 0012 up to the head run on it)."""
    url = _database_url(infrastructure, "drifted-below", "gateway")
    head = _migrated_then_changed_by_hand(
        "gateway", url, "0011", ["ALTER TABLE users DROP COLUMN token_generation"])

    migrating = _migrate_by_hand("gateway", url, "upgrade", "gateway")
    error = _the_one_error_line(migrating)
    assert "Running upgrade 0011 -> 0012" in migrating.stderr
    assert error.startswith(
        f"ERROR shared.migrations: the gateway database is at revision {head}, this release's"
        " head, but its schema is not the one this release's revisions make: column"
        " users.token_generation missing.")
    assert error.endswith(", the revisions just run committed")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head


def _migrated_then_changed_by_hand(service: str, url: str, revision: str,
                                   statements: list[str]) -> str:
    """The service's database at `url` migrated to `revision`, then changed by `statements`:
    this release's head."""
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, revision)
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    connection.close()
    return ScriptDirectory.from_config(config).get_current_head()


def _migrated_by_a_later_release(service: str, url: str) -> tuple[str, str]:
    """The service's database at `url` migrated to this release's head, then as the next
    revision, a later release's, leaves it (a column of its own: LATER_REVISION) and marked at
    it: (this release's head, that revision)."""
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "head")
    head = ScriptDirectory.from_config(config).get_current_head()
    later = f"{int(head) + 1:04d}"
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("ALTER TABLE outbox_messages ADD COLUMN later_release text")
        cursor.execute("UPDATE alembic_version SET version_num = %s", (later,))
    connection.close()
    return head, later


@pytest.mark.parametrize("service", SERVICES)
def test_the_release_before_starts_on_a_database_a_later_release_migrated(infrastructure,
                                                                           service):
    """Rolled back, a release's `*-migrate` finds the database at a revision it does not know,
    numbered past its head: a later release's. It says so in a WARNING and exits 0, the schema
    and its version left as they are, so that the APIs and workers waiting for it start (each
    release's revisions leave a schema the release before runs on; not the one this release's
    models declare, which is not compared: the later release's column is let be). Before,
    Alembic's "Can't locate revision" made it exit 1, and nothing started."""
    url = _database_url(infrastructure, "rolled-back", service)
    head, later = _migrated_by_a_later_release(service, url)
    schema = _schema(url)

    migrating = _migrate_by_hand(service, url, "upgrade", service)
    assert migrating.returncode == 0, migrating.stderr
    warnings = [line for line in migrating.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, migrating.stderr
    assert (f"the {service} database is at revision {later}, which this release (up to {head})"
            " does not know: a later release's") in warnings[0]
    assert f"python -m shared.migrations downgrade {service} {head}" in warnings[0]
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later
    assert _schema(url) == schema

    # What the warning says to do before starting a release further back: the later release
    # (here this one, its database at its head again) downgrades it.
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("UPDATE alembic_version SET version_num = %s", (head,))
    connection.close()
    below = f"{int(head) - 1:04d}"
    migrating = _migrate_by_hand(service, url, "downgrade", service, below)
    assert migrating.returncode == 0, migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == below


@pytest.mark.parametrize("target", ["0010", "head-1"])
def test_an_upgrade_to_an_older_revision_of_a_database_a_later_release_migrated_is_refused(
        infrastructure, target):
    """At a later release's revision, past every one of this release's, an upgrade to any target
    but this release's head goes back: it is refused in one line, nothing changed, naming for a
    revision named outright the downgrade to run with the later release's image; where it said
    only the later release's WARNING, and exited 0. To this release's head, named or not (what
    each `*-migrate` asks), it leaves the schema with that WARNING, and exits 0."""
    url = _database_url(infrastructure, f"later-back-{_spelt(target)}", "orders")
    head, later = _migrated_by_a_later_release("orders", url)
    schema = _schema(url)

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", target)
    error = _the_one_error_line(migrating)
    assert (f"the orders database is at revision {later}, a later release's, later than {target}:"
            " an upgrade never goes back, and nothing was changed") in error
    assert (("python -m shared.migrations downgrade orders 0010, run with the later release's"
             " image") in error) == (target == "0010")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later
    assert _schema(url) == schema

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", head)
    assert migrating.returncode == 0, migrating.stderr
    said = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert len(said) == 1 and said[0].startswith("WARNING"), migrating.stderr
    assert f"the orders database is at revision {later}, which this release" in said[0]
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later


def test_a_downgrade_of_a_database_a_later_release_migrated_says_to_run_it_with_that_release(
        infrastructure):
    """This release has no revision to take a later release's down: the downgrade is refused in
    one line that says so and names the downgrade to run with the later release's image, nothing
    changed. Before, alembic's "Can't locate revision identified by '0016'" alone, as if the
    database were broken."""
    url = _database_url(infrastructure, "later-down", "orders")
    head, later = _migrated_by_a_later_release("orders", url)
    schema = _schema(url)

    migrating = _migrate_by_hand("orders", url, "downgrade", "orders", "0010")
    assert _the_one_error_line(migrating) == (
        f"ERROR shared.migrations: the orders database is at revision {later}, a later"
        f" release's, which this release (up to {head}) does not know, nor how to take it down:"
        " run the downgrade with the later release's image (python -m shared.migrations"
        " downgrade orders 0010); nothing was changed")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later
    assert _schema(url) == schema


@pytest.mark.parametrize("layer, target", [("later-down-head-1", "head-1"),
                                           ("later-down-minus-1", "-1"),
                                           ("later-down-head", "head"),
                                           ("later-down-0010-plus-1", "0010+1")])
def test_a_downgrade_of_a_database_a_later_release_migrated_to_a_relative_target_asks_its_number(
        infrastructure, layer, target):
    """A target read from the revisions (`head-1`, `-1`, `head`) may stand for another on the
    later release: the line asks for the revision by its number. Before, it named the downgrade
    with the same target word for word, `head-1` on the later release's image."""
    url = _database_url(infrastructure, layer, "orders")
    head, later = _migrated_by_a_later_release("orders", url)

    migrating = _migrate_by_hand("orders", url, "downgrade", "orders", target)
    assert _the_one_error_line(migrating) == (
        f"ERROR shared.migrations: the orders database is at revision {later}, a later"
        f" release's, which this release (up to {head}) does not know, nor how to take it down:"
        " run the downgrade with the later release's image (python -m shared.migrations"
        f" downgrade orders REVISION, the revision by its number, not {target}, which that release"
        " reads from revisions of its own); nothing was changed")
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later


def test_a_database_behind_this_release_is_upgraded_as_before(infrastructure):
    url = _database_url(infrastructure, "behind", "gateway")
    ensure_database(url)
    command.upgrade(alembic_config("gateway", url), "0012")
    migrating = _migrate_by_hand("gateway", url, "upgrade", "gateway")
    assert migrating.returncode == 0, migrating.stderr
    assert "Running upgrade 0012 -> 0013" in migrating.stderr
    assert "WARNING" not in migrating.stderr
    assert not _table_exists(url, "idempotency_keys")


def test_an_upgrade_to_a_revision_older_than_the_databases_is_refused_in_one_line(infrastructure):
    """An operator's `upgrade orders 0010` on a database at a later revision did nothing and exited
    0, as if the database were at 0010: it exits 1 with one line saying the database is later and
    naming the downgrade that goes back, nothing changed. An upgrade to the database's own
    revision still does nothing, and succeeds."""
    url = _database_url(infrastructure, "upgrade-back", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    head, schema = _scalar(url, "SELECT version_num FROM alembic_version"), _schema(url)

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", "0010")
    error = _the_one_error_line(migrating)
    assert f"the orders database is at revision {head}, later than 0010" in error
    assert "python -m shared.migrations downgrade orders 0010" in error
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head
    assert _schema(url) == schema

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", head)
    assert migrating.returncode == 0, migrating.stderr
    assert all(line.startswith("INFO") for line in migrating.stderr.splitlines()), migrating.stderr


@pytest.mark.parametrize("start, target, back_to", [
    ("head", "head-1", "0015"), ("head", "0010+1", "0011"), ("head", "base+1", "0001"),
    ("head", "base", None), ("0010", "-1", "0009")])
def test_an_upgrade_to_a_relative_revision_or_base_older_than_the_databases_is_refused_in_one_line(
        infrastructure, start, target, back_to):
    """A target relative to a revision (`head-1`, `0010+1`) is read as alembic reads it, and
    refused as one named outright is when that is older than the database's revision; where
    alembic's upgrade did nothing and exited 0, or, for `-1`, said only that it "didn't produce 1
    migrations". No downgrade is named for such a target, nor for `base` (which drops every
    table): the line says which revision the target is."""
    url = _database_url(infrastructure, f"upgrade-back-{_spelt(target)}", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), start)
    current, schema = _scalar(url, "SELECT version_num FROM alembic_version"), _schema(url)

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", target)
    error = _the_one_error_line(migrating)
    assert (f"the orders database is at revision {current}, later than {target}"
            + (f" ({back_to})" if back_to else "") + ": an upgrade never goes back") in error
    assert "shared.migrations downgrade" not in error
    assert _scalar(url, "SELECT version_num FROM alembic_version") == current
    assert _schema(url) == schema


@pytest.mark.parametrize("target, exit_code, answer", [
    ("@head", 0, None), ("0014@head", 0, None),
    ("0010@+1", 1, "Relative revision +1 didn't produce 1 migrations"),
    ("@+1", 1, "Can't locate revision identified by '+1'")],
    ids=["@head", "0014@head", "0010@+1", "@+1"])
def test_an_upgrade_to_a_target_of_branch_syntax_is_answered_as_alembic_answers_it(
        infrastructure, target, exit_code, answer):
    """Targets of alembic's branch syntax, at the head: the check for an upgrade going back read
    them as alembic's revision map does not (an AssertionError, a traceback). They are answered
    as alembic's upgrade answers them: the head's own, doing nothing; the others in a line."""
    url = _database_url(infrastructure, f"upgrade-{_spelt(target)}", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    head, schema = _scalar(url, "SELECT version_num FROM alembic_version"), _schema(url)

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", target)
    assert migrating.returncode == exit_code, migrating.stderr
    errors = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert errors == ([f"ERROR shared.migrations: {answer}"] if answer else []), migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head
    assert _schema(url) == schema


@pytest.mark.parametrize("action, target, name", [
    ("upgrade", "@", "at"), ("upgrade", "0010@", "0010at"), ("upgrade", "head+1", "headplus1"),
    ("upgrade", "head-100", "headminus100"), ("upgrade", "", "empty"),
    ("upgrade", "0010+100", "0010plus100"), ("upgrade", "base-1", "baseminus1"),
    ("upgrade", "@-1", "atminus1"),
    ("downgrade", "@", "at"), ("downgrade", "0010@", "0010at"), ("downgrade", "@@", "atat"),
    ("downgrade", "", "empty"), ("downgrade", "base-5", "baseminus5")])
def test_a_target_alembic_cannot_read_is_refused_in_one_line(infrastructure, action, target,
                                                             name):
    """Targets that name no revision, where alembic answers others naming none in a line ("Can't
    locate revision ..."): its revision map fails an assertion on some, and the command's
    traceback escaped, once it had begun (and an empty upgrade target was read as none given,
    the head); it reads others as a revision they do not name, exit 0: `upgrade base-1` went up
    to the head, `downgrade base-5` down four revisions from the head, `upgrade @-1` did
    nothing. Refused in one line, exit 1, before anything runs: the database left at its
    revision, its schema as it was."""
    url = _database_url(infrastructure, f"unreadable-{action}-{name}", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "0012")
    schema = _schema(url)

    migrating = _migrate_by_hand("orders", url, action, "orders", target)
    assert migrating.returncode == 1, migrating.stderr
    errors = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert errors == [f"ERROR shared.migrations: '{target}' names no revision of the orders"
                      " service's to go to (a target is a revision, head, heads or base; N up or"
                      " down from one, as far as there are revisions: head-1, 0010+1; +N or -N"
                      " from the database's revision; REV@head, @head, REV@+N or REV@-N): nothing"
                      " was changed"], migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == "0012"
    assert _schema(url) == schema


@pytest.mark.parametrize("target, answer", [
    ("@", "'@' names no revision of the orders service's to go to"),
    ("+1", "Relative revision +1 didn't produce 1 migrations"),
    ("@+1", "Can't locate revision identified by '+1'")], ids=["at", "plus1", "atplus1"])
def test_a_target_alembic_cannot_read_is_refused_at_a_later_releases_revision(infrastructure,
                                                                              target, answer):
    """At a later release's revision an upgrade runs no revision, so the target went unread: `@`
    passed for this release's head, `+1` and `@+1` for none to go to, and the migration said the
    later release's WARNING and exited 0. Each is refused as at this release's head, in a line."""
    url = _database_url(infrastructure, f"later-unreadable-{_spelt(target)}", "orders")
    _head, later = _migrated_by_a_later_release("orders", url)
    schema = _schema(url)

    migrating = _migrate_by_hand("orders", url, "upgrade", "orders", target)
    error = _the_one_error_line(migrating)
    assert answer in error
    assert _scalar(url, "SELECT version_num FROM alembic_version") == later
    assert _schema(url) == schema


@pytest.mark.parametrize("target", ["head-{count}", "0001-1", "-{count}"],
                         ids=["head-count", "0001-1", "minus-count"])
def test_a_downgrade_to_a_relative_revision_may_land_on_base(infrastructure, target):
    """A relative target landing on base, as many down from the head as there are revisions, is a
    downgrade to base, as `-N` is: `head-N` and `0001-1` were refused as naming no revision.
    (Revisions are numbered in order from 0001, so the head's number is their count.)"""
    spelt = _spelt(target.format(count="n"))
    url = _database_url(infrastructure, f"down-to-base-{spelt}", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    head = _scalar(url, "SELECT version_num FROM alembic_version")
    target = target.format(count=int(head))

    migrating = _migrate_by_hand("orders", url, "downgrade", "orders", target)
    assert migrating.returncode == 0, migrating.stderr
    assert "Running downgrade 0001 -> base: " in migrating.stderr
    assert _schema(url) == {"alembic_version": _table_definition(url, "alembic_version")}
    assert _scalar(url, "SELECT count(*) FROM alembic_version") == 0


# Odd targets made of the pieces of alembic's target syntax (a revision, head, heads or base; +N or
# -N; `@`), in twos and around an `@`: one of each shape, and every target that ended in a
# traceback before shared.migrations read a target itself (by _readable and _read_by_alembic), as
# all 193 of them, from every start, both ways, found. Each is tried from every start only where
# the start is read.
# Where the database may be: none of the service's tables, its first revision, one in the middle,
# this release's head, a later release's revision.
_STARTS = ["empty", "0001", "0007", "head", "later"]
# Read from where the database is (a step from its revision, or one landing on base), tried from
# every start: `+1@-1`, `@@@-1` and `0010@-1` (and all of their shapes that end in `@-N`) failed
# an assertion on a database without revisions, `0001-1` an upgrade's from one.
_READ_FROM_THE_DATABASES_REVISION = [
    "+1", "-1", "+100", "-100", "0001-1", "0010+1", "head-1", "@+1", "@-1", "@head", "0010@+1",
    "0010@-1", "+1@-1", "@@@-1"]
# The other targets of those shapes, which failed a downgrade on a database without revisions.
_FAILED_WITHOUT_REVISIONS = [
    "0010@-100", "base@-1", "base@-100", "head@-1", "head@-100", "heads@-1", "heads@-100",
    "+1@-100", "+100@-1", "+100@-100", "-1@-1", "-1@-100", "-100@-1", "-100@-100", "@@@-100"]
# Read alike wherever the database is, so tried from one revision: each target that failed from
# every start (a downgrade to `` or `@@`, an upgrade to `head+1`, either to `@` or `0010@`), and
# one of each other shape.
_READ_ALIKE_FROM_ANYWHERE = [
    "", "@", "@@", "@@@", "@@@@", "@@@@@", "0010@", "1@", "base@", "head@", "heads@", "0010@@",
    "base@@", "head@@", "heads@@", "0010@@@", "base@@@", "head@@@", "heads@@@", "@@+1", "@@+100",
    "@@-1", "@@-100", "0010+100", "0010-100", "base+100", "base-100", "head+1", "head+100",
    "head-100", "heads+1", "heads+100", "heads-100",
    "head", "headbase", "0010@head", "@@head", "@@@base", "@@@+1", "+1+1", "+1-1", "+1@",
    "+1@@", "+1@@@", "+1@+1", "+1@head", "+1head", "+10010", "-1+1", "-1-1", "-1@", "-1@@",
    "-1@@@", "-1@+1", "-1@base", "-1heads", "-10010"]
_BOTH = ["upgrade", "downgrade"]
_ODD_TARGET_CASES = [
    (action, start, target)
    for actions, starts, targets in [(_BOTH, _STARTS, _READ_FROM_THE_DATABASES_REVISION),
                                     (["downgrade"], ["empty"], _FAILED_WITHOUT_REVISIONS),
                                     (_BOTH, ["0007"], _READ_ALIKE_FROM_ANYWHERE)]
    for action in actions for start in starts for target in targets]


@pytest.fixture(scope="module")
def databases_at(infrastructure):
    """A database of the orders service's at each of _STARTS, made once: (its URL, the settings
    naming it, its state as _state reads it)."""
    made = {}

    def at(start: str) -> tuple[str, object, tuple]:
        if start not in made:
            url = _database_url(infrastructure, f"odd-targets-{start}", "orders")
            _put_at(url, start)
            made[start] = url, load_settings({"ORDERS_DATABASE_URL": url}), _state(url)
        return made[start]
    return at


def _put_at(url: str, start: str) -> None:
    """The database at `url` made anew at `start` (one of _STARTS)."""
    ensure_database(url)
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    connection.close()
    if start == "later":
        _migrated_by_a_later_release("orders", url)
    elif start != "empty":
        command.upgrade(alembic_config("orders", url), start)


def _state(url: str) -> tuple:
    """The database's revision (None without an alembic_version table), columns and indexes."""
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
        revision = None
        if cursor.fetchone()[0]:
            cursor.execute("SELECT array_agg(version_num) FROM alembic_version")
            revision = cursor.fetchone()[0]
        cursor.execute("SELECT table_name, column_name, data_type FROM information_schema.columns"
                       " WHERE table_schema = 'public' ORDER BY 1, 2")
        columns = cursor.fetchall()
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
        indexes = cursor.fetchall()
    connection.close()
    return revision, columns, indexes


@pytest.mark.parametrize("action, start, target", _ODD_TARGET_CASES)
def test_no_target_ends_in_a_traceback(databases_at, monkeypatch, caplog, action, start, target):
    """Whatever the target and wherever the database is, the migration either does what it is
    asked (exit 0) or refuses in one line (exit 1), nothing changed: alembic's revision map fails
    assertions on targets it cannot read (`head@` read as a downgrade's, `0010@-1` on a database
    without revisions), whose tracebacks escaped. (In the process, as `main` runs it, after
    `--`: argparse takes `-1@` for an option otherwise.)"""
    import shared.migrations

    url, settings, before = databases_at(start)
    monkeypatch.setattr(shared.migrations, "get_settings", lambda: settings)
    try:
        main([action, "orders", "--", target])
        exit_code = 0
    except SystemExit as exc:
        exit_code = exc.code
    # (What the command said, in this thread: not a line another test's background thread logs
    # meanwhile, as a cache's retry of its invalidations did once.)
    said = [record for record in caplog.records
            if record.levelno > logging.INFO and record.thread == threading.get_ident()]
    if exit_code == 0:
        if _state(url) != before:  # (it did what it was asked: put back for the next case)
            _put_at(url, start)
        return
    assert exit_code == 1
    assert [record.levelno for record in said] == [logging.ERROR], caplog.text
    assert "\n" not in said[0].getMessage()
    assert _state(url) == before


def test_a_downgrade_to_a_relative_revision_is_refused_before_any_revision_goes_down(
        infrastructure):
    """`downgrade orders 0006+1` is a downgrade to 0007, below the outbox parking revision: its
    refusal, while a row lies parked, is asked before any revision goes down, as it is for
    `downgrade orders 0007`. Read as no revision, the target went unasked, and the revisions
    above the parking one went down, each committed, before the parking one refused."""
    url = _database_url(infrastructure, "downgrade-relative", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    _park_an_outbox_row(url)
    head, schema = _scalar(url, "SELECT version_num FROM alembic_version"), _schema(url)

    migrating = _migrate_by_hand("orders", url, "downgrade", "orders", "0006+1")
    error = _the_one_error_line(migrating)
    assert "1 outbox row(s) lie parked" in error and "nothing was downgraded" in error
    assert _scalar(url, "SELECT version_num FROM alembic_version") == head
    assert _schema(url) == schema


def test_a_revision_that_is_no_release_of_the_services_is_refused_in_one_line(infrastructure):
    """A revision neither this release's nor numbered past its head (revisions are numbered in
    order: tests/unit/test_migration_revisions.py) is no later release's: the migration exits 1
    with one line saying so, and changes nothing."""
    url = _database_url(infrastructure, "not-ours", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute("UPDATE alembic_version SET version_num = 'ae10f3c2b9d1'")
    connection.close()
    schema = _schema(url)
    migrating = _migrate_by_hand("orders", url, "upgrade", "orders")
    assert migrating.returncode == 1
    errors = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert len(errors) == 1, migrating.stderr
    assert errors[0].startswith("ERROR"), migrating.stderr
    assert ("the orders database is at revision ae10f3c2b9d1, which is no revision of the orders"
            " service's") in errors[0], migrating.stderr
    assert _scalar(url, "SELECT version_num FROM alembic_version") == "ae10f3c2b9d1"
    assert _schema(url) == schema


@pytest.mark.parametrize("service, owner", [("orders", "gateway"), ("orders", "payments"),
                                            ("payments", "orders"), ("gateway", "orders")])
def test_a_migration_pointed_at_another_services_database_is_refused_in_one_line(
        infrastructure, service, owner):
    """A URL naming another service's database: every service's revisions are numbered alike, so
    the revision alone passed the gateway's (past orders' head) for a later release's, and the
    orders service started on the gateway's tables; or, at one revision, upgraded nothing and
    started on payments'. Refused in one line, nothing changed, whichever the revision."""
    url = _database_url(infrastructure, f"{owner}-not-{service}", owner)
    ensure_database(url)
    command.upgrade(alembic_config(owner, url), "head")
    schema = _schema(url)
    migrating = _migrate_by_hand(service, url, "upgrade", service)
    assert migrating.returncode == 1
    errors = [line for line in migrating.stderr.splitlines() if not line.startswith("INFO")]
    assert len(errors) == 1 and errors[0].startswith("ERROR"), migrating.stderr
    assert "it is another service's; nothing was changed" in errors[0], errors[0]
    assert _schema(url) == schema


def test_a_downgrade_of_a_database_that_is_not_there_makes_none(infrastructure):
    """Only an upgrade makes its database: a downgrade with a mistyped name left an empty one
    behind."""
    url = _database_url(infrastructure, "mistyped", "gateway")
    migrating = _migrate_by_hand("gateway", url, "downgrade", "gateway", "0012")
    assert migrating.returncode == 1
    name = url.rsplit("/", 1)[1]
    assert _scalar(f"{infrastructure.postgres_base}/postgres",
                   "SELECT count(*) FROM pg_database WHERE datname = %s", name) == 0


def test_a_migration_that_cannot_reach_its_database_says_so_in_one_line():
    """No traceback for the operator to read through: what it tried (its password hidden) and
    what the driver answered."""
    url = f"postgresql+psycopg2://shop:not-to-be-shown@127.0.0.1:{free_port()}/hseshop_orders"
    migrating = _migrate_by_hand("orders", url, "upgrade", "orders")
    assert migrating.returncode == 1
    assert migrating.stdout == ""
    (line,) = migrating.stderr.splitlines()
    # (Worded as tasks.parked words it, and logged as shared.migrations, not __main__.)
    assert line.startswith("ERROR shared.migrations: orders: nothing migrated: the database at"
                           " postgresql"), line
    assert "://shop:***@127.0.0.1:" in line, line
    assert "was out of reach (OperationalError: " in line, line
    assert "Connection refused" in line and "not-to-be-shown" not in line, line


@pytest.mark.parametrize("setting, value, said", [
    ("ORDERS_DATABASE_URL", "postgresql://shop:not-to-be-shown@127.0.0.1:port/hseshop_orders",
     "ORDERS_DATABASE_URL='postgresql://shop:***@127.0.0.1:port/hseshop_orders': expected a"
     " PostgreSQL URL"),
    ("ORDERS_DATABASE_URL", "mysql://shop@127.0.0.1/hseshop_orders",
     "ORDERS_DATABASE_URL='mysql://shop@127.0.0.1/hseshop_orders': expected a PostgreSQL URL"),
    ("INBOX_MAX_ATTEMPTS", "five", "INBOX_MAX_ATTEMPTS='five': expected a whole number"),
])
def test_a_migration_given_a_setting_it_cannot_take_names_it_in_one_line_and_migrates_nothing(
        infrastructure, setting, value, said):
    """An operator's mistyped setting (a database's URL of another form, whose password is not
    shown) is said in a line, not a traceback, and nothing is made or migrated."""
    name = f"test_setting_{uuid.uuid4().hex[:8]}_orders"
    server = f"{infrastructure.postgres_base}/postgres"
    env = {**os.environ, "ORDERS_DATABASE_URL": f"{infrastructure.postgres_base}/{name}",
           setting: value}
    try:
        migrating = subprocess.run(
            [sys.executable, "-m", "shared.migrations", "upgrade", "orders"], env=env,
            capture_output=True, text=True, timeout=120)
        assert migrating.returncode == 1, migrating.stderr
        assert migrating.stdout == ""
        assert migrating.stderr.splitlines() == [
            f"ERROR shared.migrations: orders: nothing migrated: {said}"
            + (", postgresql://user:password@host:port/database" if "URL" in said else "")]
        assert _scalar(server, "SELECT count(*) FROM pg_database WHERE datname = %s", name) == 0
    finally:
        drop_database(server, name)


def test_databases_made_for_the_shop_are_migrated_though_its_user_may_not_enter_postgres(
        server_dir, note_started):
    """An administrator created the database, owned by the shop's user, on a server that keeps
    everyone else out of its `postgres` database: `upgrade` needs nothing more. (On an embedded
    server of the test's own, since the change to `postgres` is server-wide.)"""
    base, server = start_embedded_postgres(server_dir, free_port(), on_start=note_started)
    try:
        admin = psycopg2.connect(f"{base}/postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("CREATE ROLE shop LOGIN")
            cursor.execute("CREATE DATABASE shop_orders OWNER shop")
            cursor.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        admin.close()
        shop_base = base.replace("postgresql://postgres@", "postgresql+psycopg2://shop@")
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            psycopg2.connect(driver_dsn(f"{shop_base}/postgres"))
        with pytest.raises(sa.exc.OperationalError):  # one it cannot enter: what `postgres` said
            ensure_database(f"{shop_base}/shop_payments")

        url = f"{shop_base}/shop_orders"
        ensure_database(url)
        command.upgrade(alembic_config("orders", url), "head")
        assert _index_valid(url, "ix_outbox_messages_refused")
    finally:
        if server is not None:
            server.stop()


def _parked_command(url: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m tasks.parked <arguments>` on payments, its database the one at `url`."""
    env = {**os.environ, "PAYMENTS_DATABASE_URL": url.replace("+psycopg2", "")}
    return subprocess.run([sys.executable, "-m", "tasks.parked", *arguments, "payments"],
                          env=env, capture_output=True, text=True, timeout=120)


PARKED_COMMANDS = [("list",), ("list", "--outbox"), ("replay", "--all"), ("discard", "--all"),
                   ("discard", "--outbox", "--all")]


@pytest.mark.parametrize("arguments", PARKED_COMMANDS)
def test_the_parked_command_on_a_database_not_migrated_for_this_release_says_migrate_first(
        settings, infrastructure, arguments):
    """tasks.parked on a database at an older revision (payments' 0010, before the parked rows'
    indexes and columns of this release): `list` failed on UndefinedColumn with no word of
    migrating, and replay and discard ran. Now each says in a line to migrate first, exit 1,
    its parked row left parked."""
    url = _database_url(infrastructure, f"parked-at-0010-{uuid.uuid4().hex[:6]}", "payments")
    ensure_database(url)
    command.upgrade(alembic_config("payments", url), "0010")
    _park_an_outbox_row(url)
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        _inbox_row(cursor)
        cursor.execute("UPDATE inbox_messages SET parked_at = now(), attempts = 5")
    connection.close()
    ran = _parked_command(url, *arguments)
    assert (ran.returncode, ran.stdout) == (1, ""), ran.stderr
    (line,) = ran.stderr.splitlines()
    head = ScriptDirectory.from_config(alembic_config("payments", url)).get_current_head()
    assert line.endswith(f": the payments database is at revision 0010, before this release's"
                         f" head {head}: migrate first (python -m shared.migrations upgrade"
                         f" payments)"), line
    assert _scalar(url, "SELECT count(*) FROM inbox_messages WHERE parked_at IS NOT NULL") == 1
    assert _scalar(url, "SELECT count(*) FROM outbox_messages WHERE parked_at IS NOT NULL") == 1


@pytest.mark.parametrize("arguments", PARKED_COMMANDS)
def test_the_parked_command_on_another_services_database_says_it_is_not_the_services(
        settings, infrastructure, arguments):
    """tasks.parked payments pointed at the orders database (migrated, no accounts table): it
    says in a line that it is not the payments database, exit 1, nothing changed."""
    url = _database_url(infrastructure, f"orders-as-payments-{uuid.uuid4().hex[:6]}", "orders")
    ensure_database(url)
    command.upgrade(alembic_config("orders", url), "head")
    _park_an_outbox_row(url)
    ran = _parked_command(url, *arguments)
    assert (ran.returncode, ran.stdout) == (1, ""), ran.stderr
    (line,) = ran.stderr.splitlines()
    assert line.endswith(f": the database named for payments ({url.rsplit('/', 1)[1]}) is not"
                         " the payments database: it has been migrated but has no accounts table"
                         " (another service's)"), line
    assert _scalar(url, "SELECT count(*) FROM outbox_messages WHERE parked_at IS NOT NULL") == 1


def test_the_parked_command_works_on_a_database_a_later_release_migrated(settings,
                                                                        infrastructure):
    """A later release's revision leaves a schema this release runs on (rolled back, say): the
    command lists, replays and discards there as at its own head."""
    url = _database_url(infrastructure, f"parked-later-{uuid.uuid4().hex[:6]}", "payments")
    _migrated_by_a_later_release("payments", url)
    _park_an_outbox_row(url)
    listed = _parked_command(url, "list", "--outbox")
    assert listed.returncode == 0, listed.stderr
    assert "6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11  PaymentRequested" in listed.stdout
    discarded = _parked_command(url, "discard", "--outbox", "--all")
    assert discarded.returncode == 0, discarded.stderr
    assert _scalar(url, "SELECT count(*) FROM outbox_messages") == 0
