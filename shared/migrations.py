"""Schema migrations (Alembic) for each service (orders, payments, gateway): create its database if
missing, then upgrade.

    python -m shared.migrations upgrade orders
    python -m shared.migrations upgrade payments

Each service keeps its revisions in `<service>_app/migrations/versions`; an advisory lock lets
several processes start at once without running the same migration twice. Each revision runs in a
transaction of its own, so that one can leave its transaction for a statement that must run
outside any (an index built CONCURRENTLY, without blocking the tables' writers:
shared.migration_steps); the lock is held by the session for the whole upgrade.

A revision's statement waits at most MIGRATION_LIMITS' lock_timeout for a lock the running shop
holds; the revision is then rolled back, and `upgrade` tries it again after a pause.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from psycopg2.errors import DeadlockDetected
from sqlalchemy.engine import make_url

from shared.config import SERVICES, get_settings
from shared.db import CONNECTION_TIMEOUTS, held_up_by_a_lock, limit_sessions

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATION_LOCK_KEY = 0x5EED_0001
LOCK_RETRY_SECONDS = 0.5
# A revision's statement waits at most 1 s for a lock, then gives way. A schema change waiting for
# its lock holds up every statement on the table that comes after it (they queue behind its
# exclusive request): waiting out a long transaction, it would stall the shop as long. The shop's
# sessions hold their locks briefly (an idle transaction of theirs ends after a minute:
# shared/db.py, SESSION_LIMITS), so a later try gets through. Shorter than the shop's own 2 s, so
# that a shop statement queued behind the change is let through before it gives up itself. An
# index built CONCURRENTLY waits without a limit (shared/migration_steps.py): its waits hold
# nobody up.
MIGRATION_LIMITS = {"lock_timeout": "1s"}
# How long `upgrade` goes on trying a revision that gives way, and the longest pause between tries.
GIVE_WAY_FOR_SECONDS = 300.0
LONGEST_PAUSE_SECONDS = 10.0
_DATABASE_EXISTS_CODES = {"42P04", "23505"}  # duplicate_database, unique_violation
# The oldest PostgreSQL the shop runs on (as server_version_num): the relay leader's connection
# sets `idle_session_timeout` (shared/relay_leader.py), which came with 14. On 12 or 13 no relay
# could ever lead while everything else looked healthy, so `upgrade` refuses such a server.
MINIMUM_SERVER_VERSION_NUM = 140000


class ServerTooOld(RuntimeError):
    pass


def ensure_database(url: str) -> None:
    """Create the database named in `url` when it does not exist yet, looking for it from the
    server's `postgres` database. A server may keep the shop's user out of that one (the shop's
    databases then made for it by an administrator): where the database itself lets the user in,
    it exists and that is enough."""
    target = make_url(url)
    server = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT",
                              connect_args=CONNECTION_TIMEOUTS)
    try:
        try:
            conn = server.connect()
        except sa.exc.OperationalError:
            if _lets_in(target):
                return
            raise
        with conn:
            exists = conn.scalar(sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                 {"name": target.database})
            if not exists:
                try:
                    conn.execute(sa.text(f'CREATE DATABASE "{target.database}"'))
                    log.info("created database %s", target.database)
                except (sa.exc.ProgrammingError, sa.exc.IntegrityError) as exc:
                    # Another process won the race: PostgreSQL says so either way (duplicate
                    # database, or a unique violation on pg_database), depending on how far that
                    # process had got; by SQLSTATE, whatever language the server answers in.
                    if getattr(exc.orig, "pgcode", None) not in _DATABASE_EXISTS_CODES:
                        raise
    finally:
        server.dispose()


def _lets_in(target) -> bool:
    engine = sa.create_engine(target, connect_args=CONNECTION_TIMEOUTS)
    try:
        engine.connect().close()
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def alembic_config(service: str, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / f"{service}_app" / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migration_engine(url: str) -> sa.Engine:
    """An engine whose sessions run under MIGRATION_LIMITS."""
    engine = sa.create_engine(url, connect_args=CONNECTION_TIMEOUTS)
    limit_sessions(engine, MIGRATION_LIMITS)
    return engine


def upgrade(service: str, revision: str = "head") -> None:
    url = get_settings().database_url(service)
    ensure_database(url)
    engine = migration_engine(url)
    try:
        with engine.connect() as conn:
            _refuse_a_server_too_old(conn)
            _take_migration_lock(conn)
            config = alembic_config(service, url)
            config.attributes["connection"] = conn
            _giving_way_to_locks(conn, lambda: command.upgrade(config, revision))
    finally:
        engine.dispose()


def _refuse_a_server_too_old(conn: sa.Connection) -> None:
    version = int(conn.scalar(sa.text("SHOW server_version_num")))
    if version < MINIMUM_SERVER_VERSION_NUM:
        raise ServerTooOld(
            f"PostgreSQL {MINIMUM_SERVER_VERSION_NUM // 10000} or later is needed; this server is"
            f" {conn.scalar(sa.text('SHOW server_version'))} (server_version_num {version})")


def _giving_way_to_locks(conn: sa.Connection, upgrade_once: Callable[[], None]) -> None:
    """Run `upgrade_once` until it is through. A revision held up by a lock past its lock_timeout,
    or chosen as a deadlock's victim, was rolled back (what it committed before an index build
    stays, as do the revisions before it): it is tried again after a pause, doubled each time up
    to LONGEST_PAUSE_SECONDS, for GIVE_WAY_FOR_SECONDS at most."""
    deadline = time.monotonic() + GIVE_WAY_FOR_SECONDS
    pause = 1.0
    while True:
        try:
            upgrade_once()
            return
        except sa.exc.OperationalError as exc:
            gave_way = held_up_by_a_lock(exc) or isinstance(exc.orig, DeadlockDetected)
            if not gave_way or time.monotonic() + pause > deadline:
                raise
            conn.rollback()
            log.warning("a revision was held up by another session's lock, or chosen as a "
                        "deadlock's victim, and gave way (%s); trying it again in %.0f s",
                        type(exc.orig).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_SECONDS)


def _take_migration_lock(conn: sa.Connection) -> None:
    """Take the database's migration lock for this session: held across the revisions'
    transactions, on the connection they run on, and gone with the session (engine.dispose()
    closes it). Tried again every LOCK_RETRY_SECONDS rather than waited for in one statement: a
    statement waiting holds a snapshot, and an index the holder builds CONCURRENTLY waits for every
    older snapshot to end, which would be the waiter's, for ever."""
    waiting = False
    while True:
        taken = conn.scalar(sa.select(sa.func.pg_try_advisory_lock(MIGRATION_LOCK_KEY)))
        conn.commit()
        if taken:
            return
        if not waiting:
            log.info("another process is migrating this database; waiting for it")
            waiting = True
        time.sleep(LOCK_RETRY_SECONDS)


def run_env() -> None:
    """The body of each service's Alembic env.py: run online against the given connection, or
    one of its own."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_revisions(context, connection)
        return
    engine = migration_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run_revisions(context, connection)
    finally:
        engine.dispose()


def _run_revisions(context, connection: sa.Connection) -> None:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.migrations")
    parser.add_argument("action", choices=["upgrade"])
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("revision", nargs="?", default="head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    upgrade(args.service, args.revision)


if __name__ == "__main__":
    main()
