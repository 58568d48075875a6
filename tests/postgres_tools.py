"""PostgreSQL for tests: ending a connection from the server's side, or every one of a database's
at once, as a restart would, or each one waiting on a lock a session holds, a transaction
stalled holding an account's row, an app's pool with no connection free, what the other sessions
are doing, waiting for some of them to wait on a lock, two transactions made to meet on one, the
sign-out lookups an engine sends, a session ending its own connection, a COMMIT carried out
whose answer is lost, a user's orders whose COMMIT is slow, and another transaction's change
committed as a statement runs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shared.db import db, driver_cursor, driver_dsn
from shared.relay_leader import RELAY_LEADER_LOCK_KEY
from tests.polling import wait_for


def drop_database(server_url: str, name: str) -> None:
    """Drop the database `name`, if it is there, from the server at `server_url` (a database's URL
    on it)."""
    connection = psycopg2.connect(driver_dsn(server_url))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        connection.close()


def terminate_backend(database_url: str, pid: int) -> None:
    """Have the database end the connection served by backend `pid`, and no other."""
    with psycopg2.connect(driver_dsn(database_url)) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert cursor.fetchone()[0], f"no backend {pid} to end"
    admin.close()


@dataclass(frozen=True)
class EndedSession:
    """A session `end_every_session` ended, as it was then."""

    pid: int
    query: str  # the last statement it ran (or runs)
    led_the_relay: bool  # it held the relay leader's lock (shared/relay_leader.py)


def end_every_session(database_url: str) -> list[EndedSession]:
    """Have the database end every client session connected to it but the caller's own, at once,
    as a restart or a failover ends them (other databases' sessions are left alone); returns what
    they were."""
    with psycopg2.connect(driver_dsn(database_url)) as admin, admin.cursor() as cursor:
        # (A bigint advisory key is shown as its high half in classid, its low half in objid.)
        cursor.execute(f"""
SELECT pid, query, EXISTS (SELECT FROM pg_locks WHERE pg_locks.pid = activity.pid
                           AND locktype = 'advisory' AND granted AND objsubid = 1
                           AND classid = {RELAY_LEADER_LOCK_KEY >> 32}
                           AND objid = {RELAY_LEADER_LOCK_KEY & 0xFFFFFFFF}),
       pg_terminate_backend(pid)
FROM pg_stat_activity AS activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'""")
        ended = [EndedSession(pid, query, led) for pid, query, led, _ in cursor.fetchall()]
    admin.close()
    return ended


@contextmanager
def account_row_held(database_url: str, user_id: str) -> Iterator[int]:
    """A transaction of another session holding `user_id`'s account row locked, as one stalled
    would; yields its backend's pid, and rolls back when the block ends (unless the block had
    the database end the session, lock and all)."""
    holder = psycopg2.connect(driver_dsn(database_url))
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid() FROM accounts WHERE user_id = %s FOR UPDATE",
                           (user_id,))
            yield cursor.fetchone()[0]
    finally:
        try:
            holder.rollback()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            pass  # ended by the server: its transaction with it
        holder.close()


@contextmanager
def key_row_held(database_url: str, user_id: str, endpoint: str, key: str) -> Iterator[None]:
    """A transaction of another session that has recorded `user_id`'s Idempotency-Key `key` for
    `endpoint` (as "POST /orders" names it) and not committed, as an earlier request under the
    key still under way has (shared.idempotency); rolled back when the block ends."""
    holder = psycopg2.connect(driver_dsn(database_url))
    try:
        with holder.cursor() as cursor:
            cursor.execute("INSERT INTO idempotency_keys (user_id, endpoint, key, request_hash)"
                           " VALUES (%s, %s, %s, %s)", (user_id, endpoint, key, "0" * 64))
            yield
    finally:
        holder.rollback()
        holder.close()


@contextmanager
def no_connection_free(app) -> Iterator[None]:
    """The Flask `app`'s pool with no connection to give, and a request's wait for one cut to
    0.3 s: its requests time out waiting (DATABASE_BUSY). No connection is opened for it: the pool
    is emptied and counts every connection it may open as open, which holds only while none is
    out (one checked in would be handed out again): for an app none of whose requests is under
    way. The pool is as before after."""
    with app.app_context():
        pool = db.engine.pool
    assert pool.checkedout() == 0, "a connection of the app is out"
    pool.dispose()  # no idle connection to hand out
    timeout, overflow = pool._timeout, pool._overflow
    pool._timeout = 0.3  # (shared.db.POOL_WAIT_SECONDS otherwise)
    pool._overflow = pool._max_overflow  # every connection it may open (its size and overflow)
    try:
        yield
    finally:
        pool._timeout, pool._overflow = timeout, overflow


def other_sessions(cursor, condition: str, *params) -> int:
    """How many of the other sessions on the cursor's database match `condition`, a filter of
    pg_stat_activity (the cursor in autocommit: a transaction would see the view frozen)."""
    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                   f" AND pid <> pg_backend_pid() AND ({condition})", params)
    return cursor.fetchone()[0]


def wait_for_sessions_waiting_on_a_lock(database_url: str, *, count: int = 1, timeout: float,
                                        what: str) -> None:
    """Return once `count` other sessions of the database wait on a lock; fail after `timeout`."""
    wait_for_other_sessions(database_url, "wait_event_type = 'Lock'", count=count,
                            timeout=timeout, what=what)


def wait_for_other_sessions(database_url: str, condition: str, *, count: int = 1,
                            timeout: float, what: str) -> None:
    """Return once `count` other sessions of the database match `condition` (other_sessions');
    fail after `timeout`."""
    watcher = psycopg2.connect(driver_dsn(database_url))
    watcher.autocommit = True
    try:
        with watcher.cursor() as cursor:
            wait_for(lambda: other_sessions(cursor, condition) >= count,
                     timeout=timeout, interval=0.01, what=what)
    finally:
        watcher.close()


@contextmanager
def sessions_waiting_on_it_ended(database_url: str, holder_pid: int) -> Iterator[list[int]]:
    """While the block runs, every session that waits on a lock the session of backend
    `holder_pid` holds is ended as it is seen waiting, as a backend crashing on the row it reads
    would end; yields the pids of those ended so far."""
    ended: list[int] = []
    stop = threading.Event()
    ender = psycopg2.connect(driver_dsn(database_url))
    ender.autocommit = True

    def end_those_waiting() -> None:
        with ender.cursor() as cursor:
            while not stop.wait(0.02):
                cursor.execute("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE %s = ANY(pg_blocking_pids(pid))", (holder_pid,))
                ended.extend(pid for pid, _ in cursor.fetchall())

    thread = threading.Thread(target=end_those_waiting, daemon=True)
    thread.start()
    try:
        yield ended
    finally:
        stop.set()
        thread.join(10)
        ender.close()


def second_waiting_on_the_first(database_url: str, first: Callable[[Callable[[], None]], None],
                                second: Callable[[], None], *, what: str) -> None:
    """Run `first(hold)`, which calls `hold()` once it holds what `second()` will need (a row
    written, its transaction still open), then `second()` beside it; once the second waits on a
    lock (`what`), the first is let go on. Each in a thread, both ended before this returns."""
    holding, let_go = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        let_go.wait(10)

    threads = [threading.Thread(target=first, args=(hold,))]
    threads[0].start()
    try:
        assert holding.wait(10), "the first never came to hold"
        threads.append(threading.Thread(target=second))
        threads[1].start()
        wait_for_sessions_waiting_on_a_lock(database_url, timeout=5, what=what)
    finally:
        let_go.set()
        for thread in threads:
            thread.join(30)


@contextmanager
def sign_out_lookups(engine: Engine | type[Engine]) -> Iterator[list[str]]:
    """The statements asking whether a token was signed out that `engine` sends (Engine itself:
    that every engine sends), as they are sent."""
    sent: list[str] = []

    def _executing(connection, cursor, statement, parameters, context, executemany):
        if "signed_out_tokens" in statement:
            sent.append(statement)

    event.listen(engine, "before_cursor_execute", _executing)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", _executing)


def ending_its_session_by_a_statement(session: Session) -> None:
    """The session's connection ended by the server under one of SQLAlchemy's statements."""
    session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))


def ending_its_session_by_a_driver_cursor(session: Session) -> None:
    """The session's connection ended by the server under a statement of a driver_cursor's."""
    with driver_cursor(session) as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")


# What libpq says of a connection that closed under a statement (the server gone, or cut off).
_CLOSED_UNDER_IT = ("server closed the connection unexpectedly\n\tThis probably means the server"
                    " terminated abnormally\n\tbefore or while processing the request.\n")


@contextmanager
def the_next_commits_answer_lost(engine: Engine) -> Iterator[list[bool]]:
    """The next COMMIT on `engine` carried out by the server, then its answer lost as in a crash,
    a failover or a network cut: the connection closed, and the driver's error raised as libpq
    raises it. Yields a list holding True once that commit was made."""
    dialect = engine.dialect
    made: list[bool] = []

    def committed_then_lost(pooled) -> None:
        del dialect.do_commit  # (once)
        type(dialect).do_commit(dialect, pooled)
        made.append(True)
        pooled.dbapi_connection.close()
        raise psycopg2.OperationalError(_CLOSED_UNDER_IT)

    dialect.do_commit = committed_then_lost
    try:
        yield made
    finally:
        dialect.__dict__.pop("do_commit", None)


@contextmanager
def called_at_the_first_statement_naming(words: str, call: Callable[[], object], *,
                                         before: bool) -> Iterator[list[bool]]:
    """Within the block, `call` is called once: just before the first statement of this process
    holding `words` is sent (`before`), or once it has run; yields a list that then holds True.
    (Another transaction's change that `call` commits just before a statement is one that the
    statement sees under READ COMMITTED, and the statements before it in its transaction did
    not.)"""
    called: list[bool] = []
    moment = "before_cursor_execute" if before else "after_cursor_execute"

    def call_once(connection, cursor, statement, parameters, context, executemany):
        if called or words not in statement:
            return
        call()
        called.append(True)

    event.listen(Engine, moment, call_once)
    try:
        yield called
    finally:
        event.remove(Engine, moment, call_once)


def committed_on_a_connection_of_its_own(database_url: str, statement: str,
                                         params: tuple) -> int:
    """Run `statement` (with `params`) on a connection of its own, its own transaction, committed
    as it ends; returns how many rows it wrote."""
    other = psycopg2.connect(driver_dsn(database_url))
    try:
        other.autocommit = True
        with other.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.rowcount
    finally:
        other.close()


@contextmanager
def commits_of_orders_taking(database_url: str, user: str, seconds: float) -> Iterator[None]:
    """Every COMMIT of a transaction that placed an order of `user`'s takes `seconds` more, as on
    a slow disk or with a synchronous replica: a deferred trigger on the orders table (of the
    database at `database_url`), which runs as the transaction commits, after the service's last
    look at its deadline, and after its Idempotency-Key's row is written (its insert unfinished
    meanwhile: a request under the same key waits on it). Its sleep is a pg_sleep
    (pg_stat_activity's wait_event PgSleep)."""
    name = f"slow_commit_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(driver_dsn(database_url))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
                           f" $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$")
            cursor.execute(f"CREATE CONSTRAINT TRIGGER {name} AFTER INSERT ON orders"
                           " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                           f" WHEN (NEW.user_id = %s) EXECUTE FUNCTION {name}()", (user,))
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TRIGGER {name} ON orders")
                cursor.execute(f"DROP FUNCTION {name}()")
    finally:
        connection.close()
