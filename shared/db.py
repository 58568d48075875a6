"""The database extension, and `transaction()`: the one place that commits.

Use cases and message handlers get a session from `transaction()` and never commit themselves, so a
business row and the outbox row it causes are committed together or not at all, by construction.
Work that must wait for the commit (invalidating cached reads, say) is registered with
`after_commit`, or, gathered from all over the transaction into one callback (the lines to say
of it, the cache namespaces it invalidates), with `collected_after_commit`; work that costs little
done for nothing (a cache version bump) may ask to be done also when the COMMIT's answer is lost,
whether it committed unknown, and work that tells of that doubt (an operator's audit line) to be
done only then, with `if_commit_unanswered`. `driver_cursor` runs the busiest statements straight
on the driver. Pooled connections are pinged before use only after they sat idle (`init_database`
sets that up), and their cursors mark their thread's progress as each statement begins and ends
(`ProgressMarkingCursor`, for the worker's watch over hung tasks).
`connection_lost` tells a database connection lost or refused (a restart, a failover), which the
shop gets over by itself, from any other error, and `connection_lost_on` whether a connection was
lost, though whoever met the error caught it; `failure_in_a_line` says an error in a line, as the
operator's commands (shared.migrations, tasks.parked) say it.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import TypeVar

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from psycopg2 import OperationalError as DriverOperationalError
from psycopg2.extensions import TRANSACTION_STATUS_INERROR, make_dsn
from psycopg2.extensions import cursor as DriverCursor
from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import Connection, Engine, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, SessionTransaction

from shared.app_closing import close_with
from shared.jsonio import loads_strict
from shared.outage_log import OUTAGE_REMINDER_SECONDS, OutageLog, OutageWords
from shared.progress import mark_progress

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Every connection the shop opens gives up on a database it cannot hear from, instead of leaving
# it to the kernel (about 15 minutes for a request never acknowledged, over two hours for an answer
# that never comes, as when the database's host dies or is cut off): connecting fails after 10 s,
# and a connection whose peer stays silent is closed in about 30 s (TCP keepalive probes after 10 s
# of quiet, data unacknowledged for 30 s). The error then takes the path of any broken connection:
# a retry, a 503, a consumer that rewinds, a relay leader that gives up its lead.
CONNECTION_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                       "keepalives_interval": 5, "keepalives_count": 4, "tcp_user_timeout": 30_000}

# What one session of the shop may hold the others up for, so that a stuck piece fails and is
# retried instead of stalling everything queued behind it. A statement waits at most 2 s for each
# lock it needs (a row a stalled transaction holds, say). A request waits on two at most (its
# Idempotency-Key's row, then the account's or, placing an order, its user's placing lock), so one
# held up answers the service's 503 DATABASE_BUSY before the gateway's 5 s wait for it
# (UPSTREAM_TIMEOUT_SECONDS) is up; a handler's try fails and is retried with backoff, not counted
# as one of the message's attempts (tasks/inbox.py). A statement runs at most 30 s (the longest the
# shop runs, a pruner's, take well under a second). A transaction left idle 60 s (its process paused
# or hung between statements) is ended by the server, locks and all. Migrations run under limits of
# their own (shared/migrations.py: MIGRATION_LIMITS): their statements may rightly run long.
#
# And every transaction reads at READ COMMITTED (the migrations' too: MIGRATION_LIMITS), whatever
# the database's or role's default says (a managed database may default to REPEATABLE READ): the
# shop's writes count on each statement seeing what was committed before it began (a payment's
# decision read after the account's lock is taken, shared by whoever held it before; a deposit's
# account opened meanwhile). Under a snapshot per transaction those fail with serialization errors
# under contention, and a handler's failures park its messages. Options the client sends win over
# ALTER DATABASE and ALTER ROLE settings.
# (Each written as PostgreSQL's SHOW says it back, "1min" not "60s": tests/integration/
# test_connections.py reads a session's limits so.)
STATEMENT_TIMEOUT_SECONDS = 30
IDLE_IN_TRANSACTION_TIMEOUT_MINUTES = 1
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = 60 * IDLE_IN_TRANSACTION_TIMEOUT_MINUTES
SESSION_LIMITS = {"lock_timeout": "2s", "statement_timeout": f"{STATEMENT_TIMEOUT_SECONDS}s",
                  "idle_in_transaction_session_timeout":
                      f"{IDLE_IN_TRANSACTION_TIMEOUT_MINUTES}min",
                  "default_transaction_isolation": "read committed"}
# The SQLSTATEs of a statement cancelled under SESSION_LIMITS: lock_not_available (lock_timeout)
# and query_canceled (statement_timeout).
_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"


def session_options(given: str | None, limits: Mapping[str, str] = SESSION_LIMITS) -> str:
    """libpq's `options` for a connection: `limits`, then whatever options the database's URL (or
    else PGOPTIONS) gives, which so win over the limits."""
    given = os.environ.get("PGOPTIONS", "") if given is None else given
    limits_as_options = " ".join(f"-c {name}={_escaped(value)}" for name, value in limits.items())
    return f"{limits_as_options} {given}".strip()


def _escaped(value: str) -> str:
    """`value` as one word of libpq's `options`, which splits at spaces not behind a backslash."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


@contextmanager
def limit_lifted(execute: Callable[[str], object], limit: str) -> Iterator[None]:
    """No `limit` (statement_timeout, lock_timeout) for what `execute` runs inside, on a
    connection in autocommit; then the connection's own again (RESET: what it was opened with,
    SESSION_LIMITS', MIGRATION_LIMITS' or its URL's)."""
    execute(f"SET {limit} = 0")
    try:
        yield
    finally:
        execute(f"RESET {limit}")


def cancelled_by_a_limit(exc: BaseException) -> bool:
    """Whether `exc` (the driver's error, or SQLAlchemy's around it, or a TransactionAborted raised
    from it: caught, and the block went on) is a statement the database cancelled under
    SESSION_LIMITS: held up by another session's lock, or running too long."""
    return _sqlstate(exc) in (_LOCK_NOT_AVAILABLE, _QUERY_CANCELED)


def held_up_by_a_lock(exc: BaseException) -> bool:
    """Whether `exc` is a statement cancelled for waiting too long on another session's lock: no
    fault of the work itself (a statement too slow for statement_timeout is one)."""
    return _sqlstate(exc) == _LOCK_NOT_AVAILABLE


def ran_too_long(exc: BaseException) -> bool:
    """Whether `exc` is a statement cancelled under SESSION_LIMITS for running too long
    (statement_timeout): the work itself too large for one statement."""
    return _sqlstate(exc) == _QUERY_CANCELED


def _sqlstate(exc: BaseException | None) -> str | None:
    if isinstance(exc, TransactionAborted):  # (the error caught, that left it aborted)
        exc = exc.__cause__
    return getattr(getattr(exc, "orig", exc), "pgcode", None)


# The SQLSTATEs of a session the server ends or will not start for a while, as it shuts down,
# restarts or is promoted: admin_shutdown ("terminating connection due to administrator command",
# also what pg_terminate_backend says), crash_shutdown, cannot_connect_now ("the database system is
# starting up", "... shutting down", "... in recovery mode"); and class 08, connection_exception,
# but for its protocol_violation, a fault of the client's or the server's, not an outage.
_SERVER_GOING_AWAY = ("57P01", "57P02", "57P03")
_CONNECTION_EXCEPTION_CLASS = "08"
_PROTOCOL_VIOLATION = "08P01"
# psycopg2 gives no SQLSTATE for an error libpq met connecting, nor for a connection that closed
# under a statement: its message alone tells a server that refused the session with a reason
# ("FATAL:  database ... does not exist", "... password authentication failed", "sorry, too many
# clients already": a fault to fix, not an outage to wait out) from one gone or going away.
_SERVER_REFUSED = "FATAL:"
_SERVER_GOING_AWAY_WORDS = ("the database system is", "terminating connection")


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (the driver's error, or SQLAlchemy's around it) is a database connection lost
    or that could not be made because the server is away: ended by the server (a restart, a
    failover, pg_terminate_backend), broken, refused, timed out, or the server starting up or
    shutting down. The shop connects again by itself (a pool replaces its connections, a relay's
    next run leads, a consumer's next step stores), so such an error is an outage to wait out, not
    a fault. A server that refuses the session for a reason of its own (a wrong database or
    password, no connection slot left), or a statement that failed on a sound connection, is not
    one. Knowingly counted as lost, for libpq says no more of them than of a server gone: a host
    name that does not resolve (a typo, or a name moving in a failover), a server without the SSL
    asked for, and a session the server ended for an idle timeout (the relay leader's, say: a
    leader stalled for that long shows as its connection lost)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True  # (SQLAlchemy's dialect knows a broken connection, and dropped it)
    driver_error = getattr(exc, "orig", exc)
    if not isinstance(driver_error, DriverOperationalError):
        return False
    sqlstate = driver_error.pgcode
    if sqlstate is not None:
        return (sqlstate in _SERVER_GOING_AWAY
                or (sqlstate.startswith(_CONNECTION_EXCEPTION_CLASS)
                    and sqlstate != _PROTOCOL_VIOLATION))
    message = str(driver_error)
    return (_SERVER_REFUSED not in message
            or any(words in message for words in _SERVER_GOING_AWAY_WORDS))


def said_in_a_line(exc: BaseException) -> str:
    """What the database (or the driver, for one it could not reach) said of `exc`, on one line:
    its message's first, where libpq adds hints on more ("This probably means the server
    terminated ...")."""
    driver_error = getattr(exc, "orig", None) or exc
    first_line = str(driver_error).strip().partition("\n")[0]
    return f"{type(driver_error).__name__}: {first_line}"


def failure_in_a_line(exc: BaseException, url: str | None = None) -> str:
    """What the database said of `exc` on one line, and what it means, for an operator's command:
    the database out of reach, a row locked by another session too long, a statement run too
    long; naming the database by `url`, its password hidden, when given."""
    said = said_in_a_line(exc)
    database = ("the database" if url is None
                else f"the database at {make_url(url).render_as_string(hide_password=True)}")
    if connection_lost(exc):
        return f"{database} was out of reach ({said})"
    if held_up_by_a_lock(exc):
        return f"a row was locked by another session for too long ({said})"
    if ran_too_long(exc):
        return f"a statement ran too long ({said})"
    return f"{database} answered {said}"


_DATABASE_OUTAGE_WORDS = OutageWords(
    begun="%(what)s lost its database connection (%(said)s); retrying until it is back",
    still="%(what)s: database connection still lost after %(seconds).0f s, %(tries)d tries"
          " (%(said)s); retrying",
    over="%(what)s: database connection back after %(seconds).0f s, %(tries)d failed tries")


class DatabaseOutageLog(OutageLog):
    """Tells the log of one loop that retries (a consumer's steps, say) that its database
    connection is lost: as an OutageLog does, once as the outage begins, then once a reminder's
    interval on, and at INFO that it is back."""

    def __init__(self, logger: logging.Logger, what: str,
                 remind_every: float = OUTAGE_REMINDER_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(logger, what, _DATABASE_OUTAGE_WORDS, remind_every, clock)

    def lost(self, exc: BaseException) -> None:
        """A try failed on a lost connection (`connection_lost(exc)`)."""
        self.failed(said_in_a_line(exc))

    def said_if_lost(self, exc: BaseException) -> bool:
        """Whether a try failed on a lost connection (`connection_lost(exc)`), said so if it did
        (`lost`); any other error is the caller's to raise or log as it would."""
        if not connection_lost(exc):
            return False
        self.lost(exc)
        return True


# A process's pool: the connections it keeps, and the most it opens at once (its threads that
# work with the database, up to this; docker-compose.yml's PostgreSQL takes them all).
POOL_SIZE = 10
POOL_MAX_CONNECTIONS = 20
# How long a thread waits for a connection when all are out, before its request answers 503
# DATABASE_BUSY (a handler's try fails, and is retried): as long as it may wait for a lock
# (SESSION_LIMITS). SQLAlchemy's 30 s would hold a request long past the gateway's 5 s wait for it,
# and the gateway's 200 threads (its notification sockets') can all want one of its 20 at once.
POOL_WAIT_SECONDS = 2


class ProgressMarkingCursor(DriverCursor):
    """The cursor of every pooled connection: marks the thread's progress as each statement begins
    and ends (shared.progress), for the worker's watch over its handler tasks (tasks/hung_tasks.py)
    to tell a task whose statements go on, however long it runs, from one stuck between them. The
    connection's cursor factory, so that SQLAlchemy's statements and driver_cursor's, the pool's
    pings and the connect hooks' are all marked (SQLAlchemy's before/after_cursor_execute events
    see none of driver_cursor's, the handlers' busiest). A mark is a dict write: cheap."""

    def execute(self, query, vars=None):  # noqa: A002 (psycopg2's name)
        mark_progress()
        try:
            return super().execute(query, vars)
        finally:
            mark_progress()

    def executemany(self, query, vars_list):
        mark_progress()
        try:
            return super().executemany(query, vars_list)
        finally:
            mark_progress()


db = SQLAlchemy(
    metadata=MetaData(naming_convention=NAMING_CONVENTION),
    engine_options={"pool_size": POOL_SIZE, "max_overflow": POOL_MAX_CONNECTIONS - POOL_SIZE,
                    "pool_timeout": POOL_WAIT_SECONDS,
                    "connect_args": {**CONNECTION_TIMEOUTS,
                                     "cursor_factory": ProgressMarkingCursor},
                    # json and jsonb read back with their numbers as Decimals, never floats (an
                    # amount of 10.50 kept as a number would come back 10.5): SQLAlchemy's
                    # psycopg2 dialect registers it as each connection's json and jsonb caster,
                    # so it holds for the ORM's JSONB columns and driver cursors alike.
                    "json_deserializer": loads_strict},
)

log = logging.getLogger(__name__)

# The callbacks of a session's transaction under way, each with whether it is run also when the
# commit's answer is lost: [(callback, also_if_unanswered)], in the order registered.
_AFTER_COMMIT = "hseshop.after_commit"
C = TypeVar("C", bound=Callable[[], None])


def after_commit(session: Session, callback: C, *, also_if_unanswered: bool = False) -> C:
    """Run `callback` once the current transaction of `session` has committed (never on rollback).

    With `also_if_unanswered`, run it too when the COMMIT failed, as the commit's error goes on to
    the caller: most often its answer was lost with the connection (a crash, a failover, a network
    cut), and the transaction may have committed; a COMMIT the server refused (a deferred
    constraint, a serialization failure) runs it too, for nothing. So only for work that costs
    little done for nothing (a cache version bump, a miss), never for work that tells of the
    commit (a notification, a relay woken). Without it, a write kept by a commit whose answer was
    lost left its cached reads stale until they expired, the retry after it finding its work done
    and bumping nothing.

    Registering an equal callback again in one transaction runs it once: the one registered first
    is returned, so a caller can add to what it will do (collected_after_commit does so); it runs
    also if unanswered if either registration asked.
    """
    callbacks = session.info.setdefault(_AFTER_COMMIT, [])
    for n, (registered, registered_also_if_unanswered) in enumerate(callbacks):
        if registered == callback:
            # (Asked once to run also if unanswered, it does: whoever asked it counts on it.)
            callbacks[n] = (registered, registered_also_if_unanswered or also_if_unanswered)
            return registered
    callbacks.append((callback, also_if_unanswered))
    return callback


def collected_after_commit(session: Session, key: Hashable, factory: Callable[[], C], *,
                           also_if_unanswered: bool = False) -> C:
    """The one collector the current transaction of `session` has under `key`, made with
    `factory()` the first time it is asked for: callers add to it what it is to do (the lines to
    say, the namespaces to invalidate), and it is run once, after the commit, as `after_commit`
    runs a callback: in the place of the first ask, never on rollback, and when the COMMIT failed
    (its answer lost) only if an ask said `also_if_unanswered`. The next transaction has a new
    one."""
    collected = after_commit(session, _CollectedUnder(key), also_if_unanswered=also_if_unanswered)
    if collected.collector is None:
        collected.collector = factory()
    return collected.collector


# The callbacks of a session's transaction under way run only should its COMMIT fail, whether it
# committed unknown (if_commit_unanswered), in the order registered.
_IF_UNANSWERED = "hseshop.if_commit_unanswered"


def if_commit_unanswered(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` only should the COMMIT of the current transaction of `session` fail, as the
    commit's error goes on to the caller: whether it committed unknown, its answer most often lost
    with the connection (a crash, a failover, a network cut; a COMMIT the server refused runs it
    too). Never once committed, nor on rollback. For work that tells of that doubt (an audit line
    saying that what the transaction was to change may or may not have been), which after_commit's
    callbacks, run alike whether it committed or its answer was lost, cannot tell."""
    session.info.setdefault(_IF_UNANSWERED, []).append(callback)


class _CollectedUnder:
    """A transaction's collector under a key: equal to any other under an equal key, so that
    `after_commit` keeps the one registered first."""

    def __init__(self, key: Hashable):
        self.key = key
        self.collector: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.collector()

    def __eq__(self, other) -> bool:
        return isinstance(other, _CollectedUnder) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:  # (for the log line of one that failed: _run_as_unanswered)
        return repr(self.collector)


def _run_as_unanswered(callbacks: list[tuple[Callable[[], None], bool]],
                       commit_error: BaseException) -> None:
    """Run those of `callbacks` registered to run also when the commit's answer is lost, each
    whatever the others did; one that fails is logged, for the commit's error is the caller's
    news (raised after this)."""
    for callback, also_if_unanswered in callbacks:
        if also_if_unanswered:
            _run_after_a_failed_commit(callback, commit_error)


def _run_after_a_failed_commit(callback: Callable[[], None], commit_error: BaseException) -> None:
    """Run `callback` after the COMMIT failed with `commit_error`: should it fail, it is logged."""
    try:
        callback()
    except Exception:
        log.exception("after a commit that failed (%s), whether committed unknown: %r failed",
                      said_in_a_line(commit_error), callback)


@contextmanager
def after_commit_undone_if_it_raises(session: Session) -> Iterator[None]:
    """Forget the callbacks after_commit registers within the block if the block raises: for a
    savepoint rolled back, whose writes they were about, in a transaction that goes on to commit
    (a failed try of an inbox message, counted). A callback registered before the block, and added
    to within it (an invalidation's namespaces), keeps what was added: one invalidation too many."""
    registered_before = {key: len(session.info.get(key, []))
                         for key in (_AFTER_COMMIT, _IF_UNANSWERED)}
    try:
        yield
    except BaseException:
        for key, before in registered_before.items():
            del session.info.get(key, [])[before:]
        raise


class TransactionAborted(Exception):
    """A statement failed in the transaction and its error was caught: the transaction can only be
    rolled back (to a savepoint, if one was made before), and nothing of it was committed. Raised
    from the error caught (its `__cause__`, named in its message), when it was seen
    (`error_caught_on`)."""


def _aborted_by(caught: BaseException | None) -> str:
    if caught is None:
        return ("not seen (raised where SQLAlchemy and driver_cursor saw nothing: on a bare"
                " driver cursor, or caught within a driver_cursor block)")
    return f"{said_in_a_line(caught)} (SQLSTATE {_sqlstate(caught)})"


def refuse_if_aborted(connection: Connection, what: str) -> None:
    """Raise TransactionAborted, saying `what` and the error caught, from it, when the
    connection's transaction (or savepoint) is aborted (`transaction_aborted`)."""
    if transaction_aborted(connection):
        caught = error_caught_on(connection)
        raise TransactionAborted(f"{what}: {_aborted_by(caught)}") from caught


def refuse_if_rolled_back(transaction: SessionTransaction, what: str) -> None:
    """Raise TransactionAborted, saying `what` and the error caught, from it, when `transaction` (a
    session's, or a savepoint's) was rolled back under the block: a flush failed in it (an
    IntegrityError at session.flush(), say) and its error was caught. SQLAlchemy then rolls it
    back in the database at once (ROLLBACK, or ROLLBACK TO SAVEPOINT), so it is not aborted there
    (`transaction_aborted`), but what it wrote is gone, and the session takes nothing more in it:
    a commit raised PendingRollbackError, naming the error only in its text, and a savepoint went
    on to be released as if its work were done."""
    if not transaction.is_active:
        # (SQLAlchemy's own note of the flush's error, which its PendingRollbackError names.)
        caught = getattr(transaction, "_rollback_exception", None)
        said = (_aborted_by(caught) if caught is not None
                else "rolled back within it, no error of a flush noted")
        raise TransactionAborted(f"{what}: {said}") from caught


def transaction_aborted(connection: Connection) -> bool:
    """True when a statement failed on the connection's transaction and its error was caught, the
    transaction (or savepoint) not rolled back since: every statement now fails, and psycopg2
    answers a COMMIT by rolling back, raising nothing (the server says ROLLBACK)."""
    if connection.invalidated:  # (lost: said by whatever touches it next)
        return False
    dbapi_connection = connection.connection.dbapi_connection
    return (dbapi_connection is not None
            and dbapi_connection.info.transaction_status == TRANSACTION_STATUS_INERROR)


# Where a connection keeps the last error the database raised on it in its transaction (or
# savepoint) under way, for TransactionAborted to name. Kept on the connection itself, as its lost
# connection's note is (_LOST_WITH), not in its `info`: that is the pooled driver connection's,
# which outlives the transaction, holding the error's traceback and all.
_FAILED_WITH = "_hseshop_failed_with"
# The SQLSTATE of a statement refused because an earlier one failed (in_failed_sql_transaction),
# which says nothing of that one.
_IN_FAILED_TRANSACTION = "25P02"


def note_errors_caught(engine: Engine) -> None:
    """Note on each of the engine's connections the last error the database raised on it
    (`error_caught_on`), whoever then catches it: SQLAlchemy's own statements' here
    (`handle_error`), driver_cursor's in driver_cursor. Forgotten as the connection's transaction
    begins or ends, or its savepoint rolls back, or a statement goes through after it: the error
    noted is always one of the transaction (or savepoint) under way, and aborted it.

    A statement that goes through after the error is one that made the transaction sound again
    (in an aborted transaction PostgreSQL refuses every other): a ROLLBACK TO SAVEPOINT of the
    caller's own, say, legitimate PostgreSQL, which SQLAlchemy does not see as a rollback. The
    error it undid is no longer the transaction's: held, it was named for a later abort a bare
    driver cursor's statement made (and a lock timeout so undone counted that try as held up)."""

    @event.listens_for(engine, "handle_error")
    def _noting_an_error(context: ExceptionContext) -> None:
        if context.connection is not None:
            _note_error(context.connection,
                        context.sqlalchemy_exception or context.original_exception)

    for ending_or_beginning in ("begin", "commit", "rollback", "rollback_savepoint"):
        event.listen(engine, ending_or_beginning, _forget_the_error)
    event.listen(engine, "after_cursor_execute", _forget_the_error)


def _note_error(connection: Connection, error: BaseException) -> None:
    # (Only the server's errors, which alone abort a transaction; not the one that says an
    # earlier one did.)
    if _sqlstate(error) not in (None, _IN_FAILED_TRANSACTION):
        setattr(connection, _FAILED_WITH, error)


def _forget_the_error(connection: Connection, *_) -> None:
    if hasattr(connection, _FAILED_WITH):
        delattr(connection, _FAILED_WITH)


def error_caught_on(connection: Connection) -> BaseException | None:
    """The last error the database raised on `connection`'s transaction (or savepoint) under way,
    as raised (SQLAlchemy's, or the driver's where SQLAlchemy raised it so), as far as
    SQLAlchemy's statements and driver_cursor's saw: the one that aborted it, when it is aborted
    (`transaction_aborted`). A bare driver cursor's errors are not seen (SQLAlchemy hears nothing
    of them): with one of those the transaction may be aborted and no error noted, but never one
    noted from before the transaction, or the savepoint rolled back to, began (rolled back to by
    SQLAlchemy, or by a ROLLBACK TO SAVEPOINT of the caller's own: note_errors_caught), unless on a
    bare driver cursor too."""
    return getattr(connection, _FAILED_WITH, None)


class CallerGaveUp(Exception):
    """The work's caller stopped waiting for it (its deadline passed) before its new work could
    commit: nothing was committed. (A transaction that commits nothing new, a replay's, is never
    refused so: nothing_new_to_commit.)"""


# The deadline the caller of the work under way set it (time.monotonic()), if it said: a gRPC
# call's, an HTTP request's (shared.caller_deadline). Past it, `transaction()` rolls new work back
# instead of committing it: the gateway waits only for a COMMIT begun before it
# (COMMIT_GRACE_SECONDS more), and answers 504 once that is over, and its client must not find the
# work done.
_caller_waits_until: ContextVar[float | None] = ContextVar("hseshop_caller_waits_until",
                                                           default=None)


def _refuse_if_the_caller_gave_up(new_work: bool) -> None:
    """The one rule of the caller's deadline: past it, new work is not committed. A transaction
    with none (`_commits_new_work`) is committed and answered whenever it ends."""
    deadline = _caller_waits_until.get()
    if new_work and deadline is not None and time.monotonic() >= deadline:
        raise CallerGaveUp()


# The root transaction of a session declared to commit nothing new (nothing_new_to_commit), noted
# weakly, as _CONNECTED_IN is: the declaration ends with it.
_NOTHING_NEW_IN = "hseshop.nothing_new_in"


def nothing_new_to_commit(session: Session) -> None:
    """Declare that the transaction of `session` under way commits no new work: it found the
    settled answer of work committed before (the stored answer of an Idempotency-Key:
    shared.idempotency), and writes nothing. Past the caller's deadline it is committed and
    answered all the same: the deadline guards the commit of new work, so that a caller told
    504 CALLER_GAVE_UP ("nothing of it was done") never finds it done, not the reading of an
    answer settled before. A replay rolled back past it had the gateway tell its client so while
    the work it answers for was done (an order placed, a top-up made, its first answer lost).
    Whoever declares it writes nothing more in the transaction; a write of the ORM's pending as
    the block ends is new work all the same, under the deadline (`_commits_new_work`)."""
    root = session.get_transaction()
    if root is not None:
        session.info[_NOTHING_NEW_IN] = weakref.ref(root)


def _commits_new_work(session: Session) -> bool:
    """Whether the session's transaction, its block done, has work of its own to commit: unless
    it was declared to have none (nothing_new_to_commit), and has no write pending for its flush."""
    declared = session.info.get(_NOTHING_NEW_IN)
    root = session.get_transaction()
    return (declared is None or root is None or declared() is not root
            or bool(session.new or session.dirty or session.deleted))


@contextmanager
def caller_waits_until(deadline: float | None) -> Iterator[None]:
    token = _caller_waits_until.set(deadline)
    try:
        yield
    finally:
        _caller_waits_until.reset(token)


# The root transaction of a session that took a connection, noted as it takes it: SQLAlchemy says
# so only thus (SessionEvents.after_begin), Session.connection() taking one from the pool to answer.
_CONNECTED_IN = "hseshop.connected_in"


@event.listens_for(Session, "after_begin")
def _noting_the_connected_transaction(session: Session, transaction, connection) -> None:
    if transaction.parent is None:  # (a savepoint's connection is its root's)
        # (Weakly: the transaction refers to its session, and once ended is no one's business.)
        session.info[_CONNECTED_IN] = weakref.ref(transaction)


def _holds_a_connection(session: Session) -> bool:
    root = session.get_transaction()
    noted = session.info.get(_CONNECTED_IN)
    return root is not None and noted is not None and noted() is root


@contextmanager
def transaction() -> Iterator[Session]:
    """One database transaction: commit when the block ends, roll back if it raises, or if the
    caller's deadline has passed before the COMMIT of new work (CallerGaveUp; one with nothing
    new, a replay's, is committed past it: nothing_new_to_commit). Then run what after_commit
    registered: all of it once committed (each whatever the others did, one that fails logged:
    _run_once_committed), none if the block failed, only what asked to run
    also_if_unanswered if the COMMIT itself failed (committed or not, unknown), the commit's error
    raised after it."""
    session = db.session()
    if session.in_transaction():
        # Reads made earlier in the request (or task) are not part of this unit of work.
        session.rollback()
    try:
        yield session
        # (Told before the flush, which leaves nothing pending: a replay's has nothing new.)
        new_work = _commits_new_work(session)
        # (Before the flush too: work already past it takes no row lock to wait for.)
        _refuse_if_the_caller_gave_up(new_work)
        # (A flush failed under the root, or under a savepoint left open: SQLAlchemy's commit
        # raised PendingRollbackError, which named the error caught only in its text.)
        for begun in (session.get_transaction(), session.get_nested_transaction()):
            if begun is not None:
                refuse_if_rolled_back(begun, "a flush failed and its error was caught, nothing"
                                             " of the transaction committed")
        # (Raised, not committed: the "commit" would roll back unsaid, and what was to be done
        # after it be done for writes that were never kept. Looked at only when the session's
        # transaction holds a connection: asked for one, a session that began and ran no
        # statement would take one from the pool for this look.)
        if _holds_a_connection(session):
            refuse_if_aborted(session.connection(), "a statement failed and its error was caught,"
                              " nothing of the transaction committed")
        # (Flushed apart from the COMMIT: a flush that fails, an IntegrityError say, commits
        # nothing, and its failure is the block's.)
        session.flush()
        # (Once the flush is done as well: one that waited for a lock past the deadline, were it
        # looked at before only, would commit work the caller has been told failed. What the
        # gateway waits past the deadline, COMMIT_GRACE_SECONDS, is left for the COMMIT alone.)
        _refuse_if_the_caller_gave_up(new_work)
    except BaseException:
        _callbacks_taken(session)
        _rolled_back(session)
        raise
    try:
        session.commit()
    except BaseException as commit_error:
        # The COMMIT may have reached the server and been carried out, its answer lost (the
        # connection dropped: a crash, a failover, a cut), and the retry that follows may find
        # its work done and do nothing: what is safe to do for nothing is done now, and what
        # tells of the doubt is said.
        callbacks, if_unanswered = _callbacks_taken(session)
        try:
            _rolled_back(session)
        finally:
            _run_as_unanswered(callbacks, commit_error)
            for callback in if_unanswered:
                _run_after_a_failed_commit(callback, commit_error)
        raise
    _run_once_committed([callback for callback, _ in _callbacks_taken(session)[0]])


def _run_once_committed(callbacks: list[Callable[[], None]]) -> None:
    """Run `callbacks` once the transaction has committed, each whatever the others did: one that
    fails is logged, with its error, and the block's caller goes on as committed (its work is kept:
    a 500 for it had the client try again what was done). A cache bump's own failures are the
    cache's to keep and make later (shared.cache: VersionedCache.invalidate); before, a callback
    that raised skipped those after it, the bumps among them, and the request answered 500."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("after a commit: %r failed (the transaction is committed, and the"
                          " other callbacks run)", callback)


def _callbacks_taken(session: Session) -> tuple[list[tuple[Callable[[], None], bool]],
                                                 list[Callable[[], None]]]:
    """What the transaction of `session` registered to run after its COMMIT, taken off it (the
    next transaction registers its own): after_commit's, and if_commit_unanswered's."""
    return session.info.pop(_AFTER_COMMIT, []), session.info.pop(_IF_UNANSWERED, [])


@contextmanager
def rolled_back_transaction() -> Iterator[Session]:
    """One database transaction rolled back as the block ends, however it ends: a dry run's,
    which runs the very statements a transaction() would and keeps none of their work (nor runs
    what after_commit registered; a NOTIFY is sent only at a commit)."""
    session = db.session()
    if session.in_transaction():
        session.rollback()
    try:
        yield session
    finally:
        _callbacks_taken(session)
        _rolled_back(session)


def _rolled_back(session: Session) -> None:
    """Roll back the session's transaction, which failed: a rollback that finds the connection
    broken (the pool has replaced it and every older one) says nothing, what failed being the
    news, not that its rollback could not reach the server."""
    try:
        session.rollback()
    except DBAPIError as rollback_error:
        if not rollback_error.connection_invalidated:
            raise


@contextmanager
def driver_cursor(session: Session) -> Iterator:
    """A psycopg2 cursor on the connection of the session's transaction, closed when the block ends.

    For the statements the shop runs for every order, many times a second (the inbox and outbox
    machinery, the handlers', placing an order): SQLAlchemy's statement and result handling
    costs several times what the driver's does, and a plain SQL string with its parameters is no
    harder to read. Rows come back as tuples, uuid columns as strings unless cast in the query.
    """
    connection = session.connection()
    dbapi = connection.dialect.loaded_dbapi
    dbapi_connection = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()
    try:
        yield cursor
    except dbapi.Error as exc:
        # Raised as SQLAlchemy raises its own (the APIs answer an OperationalError with a 503). A
        # broken connection is found out by the rollback that follows (see transaction()), and
        # noted on the connection now, as SQLAlchemy's own statements note theirs
        # (note_connections_lost): whoever catches the error cannot hide it. Noted when the
        # driver's connection is closed, not when the dialect's is_disconnect says so: that
        # matches words, and takes a bug on a sound connection ("cursor already closed", a
        # statement on a cursor the caller closed) for a loss. (On a statement of its own that
        # SQLAlchemy so takes for one, it invalidates the connection: lost then indeed.)
        # Its error is noted too, for TransactionAborted to name (note_errors_caught, whose
        # listeners forget it as the transaction ends: on an engine without them, kept).
        error = DBAPIError.instance(None, None, exc, dbapi.Error)
        _note_if_lost(connection, error, bool(dbapi_connection.closed))
        _note_error(connection, error)
        raise error from exc
    else:
        # (An error noted before, which the block's statements undid: a ROLLBACK TO SAVEPOINT of
        # its own. note_errors_caught forgets it so after a statement of SQLAlchemy's.)
        if (hasattr(connection, _FAILED_WITH)
                and dbapi_connection.info.transaction_status != TRANSACTION_STATUS_INERROR):
            _forget_the_error(connection)
    finally:
        cursor.close()


# Where a connection keeps the first lost-connection error it met, with the driver connection it
# was met on (shared.inbox.handling reads it after a handler: a handler may catch the error, and
# the session then raises its own). Kept on the connection itself, which serves one transaction of
# a session and goes with it: not in a weak mapping, whose errors' tracebacks, holding the
# connection, would keep it for ever.
_LOST_WITH = "_hseshop_lost_with"


def note_connections_lost(engine: Engine) -> None:
    """Note on each of the engine's connections the first error with which it was lost
    (`connection_lost_on`), whoever then catches that error: SQLAlchemy's own statements here
    (`handle_error`: its dialect's `is_disconnect`, on which SQLAlchemy invalidates the connection,
    or `connection_lost`), driver_cursor's in driver_cursor."""

    @event.listens_for(engine, "handle_error")
    def _noting_a_lost_connection(context: ExceptionContext) -> None:
        if context.connection is not None:  # (None: it failed to connect, so lost nothing)
            _note_if_lost(context.connection,
                          context.sqlalchemy_exception or context.original_exception,
                          context.is_disconnect)


def _note_if_lost(connection: Connection, error: BaseException, broken: bool) -> None:
    if (broken or connection_lost(error)) and connection_lost_on(connection) is None:
        setattr(connection, _LOST_WITH, (_driver_connection_of(connection), error))


def connection_lost_on(connection: Connection) -> BaseException | None:
    """The error with which `connection` was lost (the first, if it met several: the ones after
    it say only that it is closed), or None while it has not been, as far as SQLAlchemy's
    statements and driver_cursor's saw (a bare driver cursor's errors are not seen).

    A note holds while the driver connection it was met on is closed, or the connection has none
    (SQLAlchemy invalidated it). It is dropped once the connection is on another driver connection
    (one of an `engine.connect()`, or a Session bound to one, invalidated, rolled back and
    connected again: a fresh start), or once the one it was met on is found open (a statement or
    a savepoint's release went through on it since: whatever the error was, not its loss)."""
    noted = getattr(connection, _LOST_WITH, None)
    if noted is None:
        return None
    lost_on, error = noted
    now_on = _driver_connection_of(connection)
    if now_on is None or (now_on is lost_on and now_on.closed):
        return error
    delattr(connection, _LOST_WITH)
    return None


def _driver_connection_of(connection: Connection):
    """The driver's connection `connection` is on, or None while it has none (invalidated, and
    not connected again yet; or closed), found without connecting again."""
    if connection.invalidated or connection.closed:
        return None
    return connection.connection.dbapi_connection


def driver_dsn(database_url: str) -> str:
    """The psycopg2 connection string for a service's SQLAlchemy database URL, for the few
    connections the shop holds outside the pool (the relay's LISTEN, the inbox consumer's), with
    the pool's CONNECTION_TIMEOUTS and SESSION_LIMITS."""
    url = make_url(database_url).set(drivername="postgresql")
    options = session_options(url.query.get("options"))
    url = url.difference_update_query(["options"]).render_as_string(hide_password=False)
    # (A keyword=value string: in a URL's query, libpq would take the options' "+" for a "+".)
    return make_dsn(url, **CONNECTION_TIMEOUTS, options=options)


# A pooled connection is pinged before use only when it has sat unused for longer than this.
IDLE_PING_SECONDS = 1.0
_CHECKED_IN_AT = "hseshop.checked_in_at"


def init_database(app: Flask) -> None:
    """Set the database extension up for `app` (its SQLALCHEMY_DATABASE_URI configured), with
    pooled connections pinged only after they sat idle, and each lost connection, and each error
    the database raised, noted."""
    db.init_app(app)
    with app.app_context():
        limit_sessions(db.engine)
        read_times_in_utc(db.engine)
        ping_connections_after_idle(db.engine)
        note_connections_lost(db.engine)
        note_errors_caught(db.engine)
        engines = list(db.engines.values())

    def dispose() -> None:  # (the connections in the pool closed; one checked out is left be)
        for engine in engines:
            engine.dispose()

    close_with(app, dispose)


def limit_sessions(engine: Engine, limits: Mapping[str, str] = SESSION_LIMITS) -> None:
    """Open every connection of the engine under `limits` (the URL's own options win)."""

    @event.listens_for(engine, "do_connect")
    def _connecting(dialect, connection_record, cargs, cparams) -> None:
        cparams["options"] = session_options(cparams.get("options"), limits)


def read_times_in_utc(engine: Engine) -> None:
    """Have every connection of the engine give the times it reads in UTC, as the shop writes
    those it makes itself (a new order's answer, an event's): else a session takes the server's
    time zone (an embedded PostgreSQL takes the host's), PGTZ's or the URL's options', and one
    order came back as 12:00+00:00 from POST and 15:00+03:00 from GET, which the page sorted as
    two different moments. Set once a connection is opened: PGTZ, sent as it connects, would win
    over the `options` the session limits travel in."""

    @event.listens_for(engine, "connect")
    def _in_utc(dbapi_connection, connection_record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()


def ping_connections_after_idle(engine: Engine) -> None:
    """Check that a pooled connection is alive before use, if it sat in the pool for a while.

    Connections die while they sit in the pool (a database restart, a dropped network path); one
    handed back a moment ago was alive then. SQLAlchemy's `pool_pre_ping` pings before every
    transaction: a round trip for every request of a busy service, and for every batch of a
    worker. A dead connection found here is replaced (the pool retries the checkout); one that
    dies in use fails its transaction (a 503 from an API, a retry in a worker), and the pool then
    replaces every connection older than the failure.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checking_out(dbapi_connection, record, proxy) -> None:
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is not None and time.monotonic() - checked_in_at <= IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"a pooled connection is gone: {exc}") from exc


def database_now(session: Session) -> datetime:
    """Now by the database's clock (clock_timestamp(): the moment, not the transaction's start,
    now()), read in the session's transaction: the clock of every time the database writes (a
    column's server default, now(), clock_timestamp()), and so the one to measure such times by
    (the inbox's, shared.inbox.model; a pruner's cutoff, tasks/retention.py). A worker's clock need
    not agree with it: one ahead of it by a day, measuring the database's times, took them for a
    day older than they were."""
    return session.scalar(text("SELECT clock_timestamp()"))


def delete_oldest_before(session: Session, *, table: str, column: str, cutoff: datetime,
                         limit: int) -> int:
    """Delete up to `limit` rows of `table` whose `column` (a time, indexed) is before `cutoff`,
    oldest first; returns how many. For a pruner, which repeats it, a transaction each, until it
    deletes fewer (tasks/retention.py). The rows are found through the index of `column` and
    deleted by their physical place (ctid): by a key instead, the planner could join a scan of the
    whole table to the keys. The condition is checked again on the rows reached: a row updated
    meanwhile is reached in its new version, which the inner query never saw."""
    return session.execute(text(f"""
DELETE FROM {table}
WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {column} < :cutoff
                       ORDER BY {column} LIMIT :limit))
  AND {column} < :cutoff"""), {"cutoff": cutoff, "limit": limit}).rowcount
