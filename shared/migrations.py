"""Schema migrations (Alembic) for each service (orders, payments, gateway): create its database if
missing, then upgrade (or, by hand, downgrade).

    python -m shared.migrations upgrade orders
    python -m shared.migrations upgrade payments
    python -m shared.migrations downgrade gateway 0012

An upgrade never goes back: one to a target that alembic reads as a revision older than the
database's (one named outright, `base`, or one relative to a revision, `head-1`, or to the
database's, `-1`) is refused (a downgrade goes back); so, on a database a later release migrated,
is one to any revision of this release's but its head (below). A target is read before
anything runs: a revision, `head`, `heads` or `base`; N revisions up or down from one (`head-1`,
`0010+1`, `base+1`, landing on a revision, or on base for a downgrade, never past the head) or
from the database's (`+1`, `-1`); the head of a revision's branch (`0014@head`, `@head`), or N
up or down on it (`0010@+1`). Any other (`@`, `@-1`, `0010@`, `head@`, `base-1`, `head+1`, an
empty one) is refused in a line, and so is one alembic cannot follow from the database's
revision (`0010@-1` on a database without one), in alembic's own line where it refuses it itself
("Can't locate revision ...", "Relative revision +1 didn't produce 1 migrations"): no target
ends in a traceback.

Each service keeps its revisions in `<service>_app/migrations/versions`; an advisory lock lets
several processes start at once without running the same migration twice. Each revision runs in a
transaction of its own, so that one can leave its transaction for a statement that must run
outside any (an index built CONCURRENTLY, without blocking the tables' writers:
shared.migration_steps); the lock is held by the session for the whole upgrade.

A revision's statement waits at most MIGRATION_LIMITS' lock_timeout for a lock the running shop
holds; the revision is then rolled back, and `upgrade` tries it again after a pause.

At this release's head, `upgrade` (whether it ran revisions or had nothing to do) compares the
database's schema with what the service's models declare, and refuses, naming each difference, one
that records the head and has another schema: migrated by a revision edited since, or one whose
number was reused (shared.schema_drift; shared/revision_pins.json pins each committed revision).

Rolling back: a database a later release migrated is at a revision this release does not know. Each
release's revisions leave a schema the release before runs on (it runs on during a rolling upgrade;
but for the outbox's early rewrites, README's "Rolling back"), so `upgrade` to this release's head
(what `upgrade SERVICE` asks) leaves such a schema as it is, says so, and returns: the release
before starts; one to another of this release's revisions, every one older than the database's, is
refused, and so is a downgrade (only the later release's revisions can go down: run it with that
release's image). Revisions are numbered in order (0001, 0002, ...), which is how it tells a later
release's revision (numbered past this release's head) from one that is no revision of the service's
at all, which it refuses.
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from psycopg2.errors import DeadlockDetected
from sqlalchemy.engine import make_url

from shared.config import SERVICES, get_settings, settings_or_exit
from shared.db import (CONNECTION_TIMEOUTS, failure_in_a_line, held_up_by_a_lock, limit_sessions,
                       said_in_a_line)
from shared.migration_steps import DowngradeRefused, UpgradeRefused
from shared.schema_drift import harmless_extra, said, schema_drift

# By its name, not __name__: run as `python -m shared.migrations`, that is `__main__`, which its
# log lines (devstack echoes them on the terminal) would show.
log = logging.getLogger("shared.migrations")

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
# nobody up. And its transactions read at READ COMMITTED, as the shop's do (shared/db.py,
# SESSION_LIMITS), whatever the database's default: a step that locks its table and then counts
# what it would lose (shared/migration_steps.py) must count what was committed up to its lock, not
# what its transaction's first statement (alembic's read of the version) saw.
MIGRATION_LIMITS = {"lock_timeout": "1s", "default_transaction_isolation": "read committed"}
# How long `upgrade` goes on trying a revision that gives way, and the longest pause between tries.
GIVE_WAY_FOR_SECONDS = 300.0
LONGEST_PAUSE_SECONDS = 10.0
_DATABASE_EXISTS_CODES = {"42P04", "23505"}  # duplicate_database, unique_violation
_INSUFFICIENT_PRIVILEGE = "42501"
# libpq's words for a password the server refused (psycopg2 gives no SQLSTATE for an error met
# connecting), and where the compose file's roles get theirs.
_PASSWORD_REFUSED = "password authentication failed"
_PASSWORD_SET_BY_THE_SCRIPT = (
    ": the role's password is the one deploy/postgres-init/01-service-databases.sh sets from"
    " {variable}_DB_PASSWORD (deploy/service-roles.env, or deploy/postgres.env where the release"
    " before kept it, which then wins; the compose service postgres-roles runs it at every"
    " `docker compose up`), and {variable}_DATABASE_URL must hold the same")
# The oldest PostgreSQL the shop runs on (as server_version_num): the relay leader's connection
# sets `idle_session_timeout` (shared/relay_leader.py), which came with 14. On 12 or 13 no relay
# could ever lead while everything else looked healthy, so `upgrade` refuses such a server.
MINIMUM_SERVER_VERSION_NUM = 140000


class ServerTooOld(RuntimeError):
    pass


class DatabaseUnreachable(RuntimeError):
    pass


class NotTheServicesDatabase(RuntimeError):
    """The database holds another service's schema (a URL pointed at the wrong one)."""


class UnknownRevision(RuntimeError):
    """The database is at a revision that is neither this release's nor, by its number, a later
    release's."""


class ALaterReleasesToGoDown(RuntimeError):
    """A downgrade of a database at a later release's revision, which only that release's
    revisions can take down."""


class NotAnUpgrade(RuntimeError):
    """An upgrade asked for a revision older than the database's: going back is a downgrade's."""


class SchemaNotThisReleases(RuntimeError):
    """A database at this release's head whose schema is not the one its revisions make."""


class UnreadableTarget(RuntimeError):
    """A target that names no revision to go to (`@`, `@-1`, `0010@`, `base-1`, `head+1`, an
    empty one; `0010@-1` on a database without revisions): alembic's revision map fails an
    assertion on some, and reads others as a revision they do not name (`base-1` as the head,
    `@-1` as none to go to)."""

    def __init__(self, service: str, target: str) -> None:
        super().__init__(
            f"'{target}' names no revision of the {service} service's to go to (a target is a"
            " revision, head, heads or base; N up or down from one, as far as there are"
            " revisions: head-1, 0010+1; +N or -N from the database's revision; REV@head,"
            " @head, REV@+N or REV@-N): nothing was changed")


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
    # (For a revision's refusal to name the service's commands: shared.migration_steps.)
    config.attributes["service"] = service
    return config


def migration_engine(url: str) -> sa.Engine:
    """An engine whose sessions run under MIGRATION_LIMITS."""
    engine = sa.create_engine(url, connect_args=CONNECTION_TIMEOUTS)
    limit_sessions(engine, MIGRATION_LIMITS)
    return engine


def upgrade(service: str, revision: str = "head") -> None:
    """Upgrade the service's database to `revision`; when a later release has migrated it, leave
    it as it is (see the module's docstring). Refused, the database untouched, when alembic reads
    `revision` as older than the database's (_refuse_going_back)."""
    def upgrade_to(config: Config, conn: sa.Connection) -> None:
        script = ScriptDirectory.from_config(config)
        revisions = _service_revisions(script)
        current = _current_revisions(conn)
        later = _a_later_releases(service, script, current)
        # (At a later release's revision, which alembic does not know, read from the head.)
        starting = (script.get_current_head(),) if later else current
        _refuse_an_unreadable_target(service, script, revisions, starting, revision,
                                     downgrading=False)
        _refuse_going_back(service, script, starting, later, revision)
        if later:
            # (No upgrade runs to read the target, so it is read here, as at this release's
            # head: `+1` is refused in alembic's line, "didn't produce 1 migrations".)
            _read_as_the_command_reads(service, script, starting, revision, downgrading=False)
            _say_left_as_a_later_release_left_it(service, script, later)
            return
        _giving_way_to_locks(conn, lambda: command.upgrade(config, revision))
        _refuse_a_schema_not_this_releases(service, script, conn, current)
        _say_if_nothing_was_to_do(service, script, conn, current)

    _migrate(service, upgrade_to, create_if_missing=True)


def downgrade(service: str, revision: str) -> None:
    """Downgrade the service's database to `revision`, as the release that knows its revisions
    (this one, or a later one) may before an earlier release is started on it; refused, the
    database untouched, when a revision it goes down through would refuse to."""
    def downgrade_to(config: Config, conn: sa.Connection) -> None:
        script = ScriptDirectory.from_config(config)
        revisions = _service_revisions(script)
        current = _current_revisions(conn)
        _refuse_a_later_releases_revision(service, script, current, revision)
        _refuse_an_unreadable_target(service, script, revisions, current, revision,
                                     downgrading=True)
        _refuse_what_a_revision_going_down_would(service, script, conn, current, revision)
        _giving_way_to_locks(conn, lambda: command.downgrade(config, revision))
        _say_if_nothing_was_to_do(service, script, conn, current)

    _migrate(service, downgrade_to)


def _say_if_nothing_was_to_do(service: str, script: ScriptDirectory, conn: sa.Connection,
                              before: tuple[str, ...]) -> None:
    """A line where no revision ran, the database at the target already: alembic says nothing
    then (its lines of context are not shown), and the command would have said nothing at all."""
    after = _current_revisions(conn)
    if after == before:
        at_head = after == (script.get_current_head(),)
        log.info("%s: the database is at %s already%s: nothing to do", service,
                 _revisions_or_base(after), ", this release's head" if at_head else "")


def _refuse_a_schema_not_this_releases(service: str, script: ScriptDirectory,
                                       conn: sa.Connection, before: tuple[str, ...]) -> None:
    """At this release's head, whether revisions ran or not, compare the database's schema with what
    the service's models declare (which its revisions make: the migration tests check it), and
    refuse, naming each difference, a database that records this release's head and has another
    schema. One migrated by a revision edited since, or by another under its number, is such a
    database: `upgrade` found nothing to do there, and the services failed at run time on a column
    or an index it lacks. What it has that the models do not declare and no write of the services'
    can trip over (a table, an index not unique, a column taking nulls or with a default: a DBA's
    index, say; schema_drift.harmless_extra) is only warned of: refused, a DBA's index would keep
    the whole shop from starting. An extra unique index or constraint, foreign key or column
    needing a value is refused, as every insert might fail on it. At another of this release's
    revisions (an upgrade to one below the head) there is nothing to compare with: the models
    declare the head's schema; and a later release's schema is left as it is, unchecked (upgrade).
    Some 0.1 s of catalog reads, and 0.15 s loading the models in a process that had not."""
    head = script.get_current_head()
    at = _current_revisions(conn)
    if at != (head,):
        return
    try:
        differences = schema_drift(service, conn)
    finally:
        conn.rollback()  # (no transaction left open)
    extras = [difference for difference in differences if harmless_extra(difference)]
    if extras:
        log.warning("%s: the database has what this release's revisions do not make: %s (added"
                    " by hand, say: left as it is)", service, "; ".join(map(said, extras)))
    differences = [difference for difference in differences if not harmless_extra(difference)]
    if differences:
        ran = "" if at == before else ", the revisions just run committed"
        raise SchemaNotThisReleases(
            f"the {service} database is at revision {head}, this release's head, but its schema"
            f" is not the one this release's revisions make: {'; '.join(map(said, differences))}."
            " It was migrated by a revision edited since (or one whose number was reused), or"
            " changed by hand, and the services may fail on it (a column or an index missing):"
            " bring it to this release's schema by hand (a revision that has been committed is"
            f" never edited: a change is a new revision){ran}")


def _current_revisions(conn: sa.Connection) -> tuple[str, ...]:
    """The database's revisions (under the migration lock: another release's `upgrade` may be
    running)."""
    current = MigrationContext.configure(conn).get_current_heads()
    conn.commit()  # (no transaction left open: each revision runs in one of its own)
    return current


def _service_revisions(script: ScriptDirectory) -> list[str]:
    """The service's revisions, its head's first. Every revision module is loaded here, so that
    one that fails to load says so itself, not as a target alembic could not read (the map is
    kept for each later reading)."""
    return [script_revision.revision for script_revision in script.walk_revisions()]


def _refuse_an_unreadable_target(service: str, script: ScriptDirectory, revisions: list[str],
                                 current: tuple[str, ...], target: str,
                                 downgrading: bool) -> None:
    """Refuse, before anything runs, a target that is none the command reads (_readable; the
    module's docstring says which are), from the `current` revisions, `revisions` being the
    service's: in alembic's own line (a CommandError) when it refuses it itself, else as an
    UnreadableTarget, where its revision map failed an assertion on some (a traceback, once the
    command had begun) and read others as a revision they do not name (`base-1` as the head)."""
    if _readable(target, revisions, downgrading):
        return
    _read_as_the_command_reads(service, script, current, target, downgrading)
    raise UnreadableTarget(service, target)


# A target: an optional branch and `@`, a symbol (a revision, head, heads or base; empty for the
# database's revision) and an optional step, +N or -N; what alembic's `_relative_destination`
# reads, each part without an `@`, `+` or `-` of its own.
_TARGET = re.compile(r"(?:(?P<branch>[^@+-]*)@)?(?P<symbol>[^@+-]*)(?P<step>[+-][1-9][0-9]*)?")
_NAMED = ("head", "heads", "base")


def _readable(target: str, revisions: list[str], downgrading: bool) -> bool:
    """Whether `target` is one the command reads (the module's docstring), `revisions` being the
    service's, its head's first."""
    parts = _TARGET.fullmatch(target)
    if parts is None:
        return False
    branch, symbol, step = parts.group("branch", "symbol", "step")
    if branch is not None:  # REV@head, @head, REV@+N or REV@-N
        if step is None:
            return symbol == "head" and (branch == "" or _an_id(branch))
        return symbol == "" and _an_id(branch)
    if step is None:  # a revision, head, heads or base
        return symbol in _NAMED or _an_id(symbol)
    if symbol == "":  # +N or -N from the database's revision
        return True
    return ((symbol in _NAMED or _an_id(symbol))
            and _lands_on_a_revision(symbol, int(step), revisions, downgrading))


def _an_id(text: str) -> bool:
    """Whether `text` (a part _TARGET reads) may be a revision's id: alembic says itself when no
    revision has it."""
    return text != "" and text not in _NAMED


def _lands_on_a_revision(origin: str, step: int, revisions: list[str], downgrading: bool) -> bool:
    """Whether `step` revisions up or down from `origin` (a revision, head, heads or base) is one
    of the service's `revisions` (its head's first), counted from base, 0, to the head: never past
    the head, and on base only for a downgrade (alembic's upgrade fails an assertion on `0001-1`;
    an upgrade goes to base by its name). An origin alembic knows by part of its id, or that no
    revision has, is left to it."""
    if origin in revisions:
        at_origin = len(revisions) - revisions.index(origin)
    elif origin == "base":
        at_origin = 0
    elif origin in ("head", "heads"):
        at_origin = len(revisions)
    else:
        return True
    lowest = 0 if downgrading else 1
    return lowest <= at_origin + step <= len(revisions)


def _read_as_the_command_reads(service: str, script: ScriptDirectory, current: tuple[str, ...],
                               target: str, downgrading: bool) -> None:
    """Read `target` from the `current` revisions as alembic's upgrade or downgrade command reads
    it (ScriptDirectory's _upgrade_revs or _downgrade_revs, each turning a RevisionError into
    the CommandError the command raises), raising that CommandError where it refuses it."""
    with _read_by_alembic(service, target):
        if downgrading:
            script._downgrade_revs(target, current)
        else:
            script._upgrade_revs(target, current)


@contextmanager
def _read_by_alembic(service: str, target: str) -> Iterator[None]:
    """Around alembic's reading of `target`: whatever it raises that is not its refusal of the
    target (a RevisionError, or the command's CommandError) is the target refused as an
    UnreadableTarget, in a line. Its revision map fails an assertion on targets it cannot follow
    (`head@` read as a downgrade's, `0010@-1` from no revision), whatever else follows with python
    -O. (The revision modules are loaded before, _service_revisions: one that fails says so.)"""
    try:
        yield
    except (RevisionError, CommandError):
        raise
    except Exception as exc:
        raise UnreadableTarget(service, target) from exc


def _revisions_down_to(service: str, script: ScriptDirectory, current: tuple[str, ...],
                       target: str) -> list[Script]:
    """The revisions a downgrade from the `current` revisions to `target` goes down through,
    `current`'s first, `target` read as alembic's downgrade reads it: a revision, `base`, or one
    relative to a revision (`head-1`, `0010+1`) or to `current` (`-1`). None when `target` is
    `current` or a later revision, or when alembic reads no way down to it (it says why itself,
    as it runs); an UnreadableTarget when alembic cannot follow it (_read_by_alembic)."""
    with _read_by_alembic(service, target):
        try:
            return list(script.iterate_revisions(current, target, select_for_downgrade=True))
        except RevisionError:
            return []


def _refuse_going_back(service: str, script: ScriptDirectory, starting: tuple[str, ...],
                       later: tuple[str, ...], target: str) -> None:
    """Refuse an upgrade to a target a downgrade would go down to, older than the database's
    revision: alembic's upgrade does nothing and succeeds, which told the operator who meant to
    go back that the database was there (and `-1`, which it reads as no upgrade, it refuses in
    its own words). The database's revisions are `starting`, but at a `later` release's
    revision, past every one of this release's, this release's head, which a target is read
    from: any revision of this release's but the head goes back
    (the head itself, what `upgrade SERVICE` asks, leaves the schema as the later release left
    it). The downgrade that goes back is named when `target` names its revision outright: not
    `base`, which drops every table, nor a relative one; at a later release's revision, run with
    that release's image."""
    going_down = _revisions_down_to(service, script, starting, target)
    if not going_down:
        return
    back_to = going_down[-1].down_revision or "base"
    at = f"{', '.join(later)}, a later release's" if later else going_down[0].revision
    # (What a target relative to the database's revision, `-1`, stands for at a later release's
    # revision, this release cannot tell.)
    stands_for = "" if target == back_to or later else f" ({back_to})"
    downgrade_named = ""
    if target == back_to != "base":
        downgrade_named = (
            f". To take the database back to {target}: python -m shared.migrations downgrade"
            f" {service} {target}" + (f", run with the later release's image (this one does not"
                                      f" know revision {', '.join(later)})" if later else ""))
    raise NotAnUpgrade(
        f"the {service} database is at revision {at}, later than {target}{stands_for}: an upgrade"
        f" never goes back, and nothing was changed{downgrade_named}")


def _refuse_what_a_revision_going_down_would(service: str, script: ScriptDirectory,
                                             conn: sa.Connection, current: tuple[str, ...],
                                             target: str) -> None:
    """Ask each revision the downgrade to `target` goes down through whether it would refuse (its
    module's `refuse_downgrade(conn, service=service)`, raising DowngradeRefused, its way out in
    the service's commands), before any goes down: each revision runs in a transaction of its
    own, so one refusing in the middle of the way left the revisions above it gone down and
    committed. (It asks again as it goes down, under its table's lock; nothing else migrates
    between the two, the migration lock held.)"""
    going_down = _revisions_down_to(service, script, current, target)
    try:
        for script_revision in going_down:
            refusal = getattr(script_revision.module, "refuse_downgrade", None)
            if refusal is not None:
                refusal(conn, service=service)  # (its way out names the service's commands)
    finally:
        conn.rollback()  # (no transaction left open: each revision runs in one of its own)


def _migrate(service: str, run: Callable[[Config, sa.Connection], None],
             create_if_missing: bool = False) -> None:
    """Run `run` on a connection to the service's database (made if missing, when asked: an
    upgrade, not a downgrade, which a mistyped name would otherwise leave behind), holding the
    database's migration lock, once it is known to be the service's."""
    url = get_settings().database_url(service)
    engine = migration_engine(url)
    try:
        with _connect(service, url, engine, create_if_missing) as conn:
            _refuse_a_server_too_old(conn)
            _take_migration_lock(conn)
            _refuse_another_services_database(service, conn)
            config = alembic_config(service, url)
            config.attributes["connection"] = conn
            run(config, conn)
    finally:
        engine.dispose()


def _connect(service: str, url: str, engine: sa.Engine,
             create_if_missing: bool) -> sa.Connection:
    try:
        if create_if_missing:
            ensure_database(url)
        return engine.connect()
    except sa.exc.OperationalError as exc:
        # In a line, as tasks.parked says it: the driver's first line says why (refused, no such
        # host, password refused), the rest is hints; the URL without its password, for the log.
        raise DatabaseUnreachable(
            f"{service}: nothing migrated: {failure_in_a_line(exc, url)}"
            + (_PASSWORD_SET_BY_THE_SCRIPT.format(variable=service.upper())
               if _PASSWORD_REFUSED in str(exc) else "")) from exc
    except sa.exc.ProgrammingError as exc:
        # A role without CREATEDB, as each service's is in docker-compose.yml, whose database was
        # not made for it (or was dropped since).
        if getattr(exc.orig, "pgcode", None) != _INSUFFICIENT_PRIVILEGE:
            raise
        target = make_url(url)
        raise DatabaseUnreachable(
            f"{service}: nothing migrated: there is no database {target.database} and"
            f" {target.username} may not create one ({said_in_a_line(exc)}): make it first, owned"
            f" by {target.username} (deploy/postgres-init/01-service-databases.sh makes each"
            " service's)") from exc


# A table each service's first revision makes and no other service has: a database at some
# revision without it is another service's (the revisions of all three are numbered alike, so
# the number alone could pass another's for a later release's, or for this one's).
_OWN_TABLES = {"orders": "orders", "payments": "accounts", "gateway": "users"}


def _refuse_another_services_database(service: str, conn: sa.Connection) -> None:
    if _another_services_database(service, conn):
        raise NotTheServicesDatabase(
            f"the database named for {service} ({conn.engine.url.database}) has been migrated but"
            f" has no {_OWN_TABLES[service]} table: it is another service's; nothing was changed")


def _another_services_database(service: str, conn: sa.Connection) -> bool:
    """Whether the database is another service's: migrated, without the service's own table."""
    migrated = bool(MigrationContext.configure(conn).get_current_heads())
    own = conn.scalar(sa.text("SELECT to_regclass(:own) IS NOT NULL"),
                      {"own": _OWN_TABLES[service]})
    conn.commit()  # (no transaction left open: each revision runs in one of its own)
    return migrated and not own


def why_not_ready_for_this_release(service: str, conn: sa.Connection) -> str | None:
    """Why this release's code may not work on the database as the service's (None when it may),
    in a few words with what to do, for a command that reads and changes it outside the service
    (tasks.parked): another service's (by _OWN_TABLES, as `upgrade` tells it); or one at a revision
    before this release's head, none at all say, whose schema may lack what the code reads or
    writes (a column: the command failed on UndefinedColumn, with no word of migrating). A later
    release's revision is one it may work on (each release's revisions leave a schema the release
    before runs on); one that is no release's is refused as `upgrade` refuses it."""
    # (Without alembic's `Context impl PostgresqlImpl.` and `Will assume transactional DDL.`, as
    # the migrating command shows its lines.)
    alembic_lines, shown_as_migrating = (logging.getLogger("alembic.runtime.migration"),
                                         _EachRevisionInALine())
    alembic_lines.addFilter(shown_as_migrating)
    try:
        return _why_not_ready(service, conn)
    finally:
        alembic_lines.removeFilter(shown_as_migrating)


def _why_not_ready(service: str, conn: sa.Connection) -> str | None:
    if _another_services_database(service, conn):
        return (f"the database named for {service} ({conn.engine.url.database}) is not the"
                f" {service} database: it has been migrated but has no {_OWN_TABLES[service]}"
                f" table (another service's)")
    script = ScriptDirectory.from_config(alembic_config(service, url=""))  # (its revisions alone)
    current = _current_revisions(conn)
    head = script.get_current_head()
    try:
        if current == (head,) or _a_later_releases(service, script, current):
            return None
    except UnknownRevision as exc:
        return str(exc)
    return (f"the {service} database is at revision {_revisions_or_base(current)}, before this"
            f" release's head {head}: migrate first (python -m shared.migrations upgrade"
            f" {service})")


def _a_later_releases(service: str, script: ScriptDirectory,
                      current: tuple[str, ...]) -> tuple[str, ...]:
    """The database's revisions this release does not know, a later release's (numbered past its
    head): none when it knows them all; refuses a revision that is neither this release's nor
    numbered past its head."""
    known = {script_revision.revision for script_revision in script.walk_revisions()}
    unknown = tuple(revision for revision in current if revision not in known)
    head = script.get_current_head()
    if not all(_numbered_past(rev, head) for rev in unknown):
        raise UnknownRevision(
            f"the {service} database is at revision {', '.join(unknown)}, which is no revision of"
            f" the {service} service's, this release's (up to {head}) or a later one's (numbered"
            f" past {head}): is this the {service} database?")
    return unknown


def _refuse_a_later_releases_revision(service: str, script: ScriptDirectory,
                                      current: tuple[str, ...], target: str) -> None:
    """Refuse a downgrade from a later release's revision (or one that is no release's:
    _a_later_releases), which this release has no revision to take down: alembic said only
    "Can't locate revision identified by '0017'", as if the database were broken. The downgrade
    to run with the later release's image is named with `target` when it names a revision
    outright (or `base`): one relative to a revision (`head-1`, `-1`), or `head`, may stand for
    another there, and the revision is asked for by its number."""
    later = _a_later_releases(service, script, current)
    if not later:
        return
    parts = _TARGET.fullmatch(target)
    outright = (parts is not None and parts["branch"] is None and parts["step"] is None
                and (parts["symbol"] == "base" or _an_id(parts["symbol"])))
    raise ALaterReleasesToGoDown(
        f"the {service} database is at revision {', '.join(later)}, a later release's, which"
        f" this release (up to {script.get_current_head()}) does not know, nor how to take it"
        f" down: run the downgrade with the later release's image (python -m shared.migrations"
        f" downgrade {service} {target if outright else 'REVISION'}"
        + ("" if outright else f", the revision by its number, not {target}, which that release"
                               " reads from revisions of its own")
        + "); nothing was changed")


def _say_left_as_a_later_release_left_it(service: str, script: ScriptDirectory,
                                         later: tuple[str, ...]) -> None:
    head = script.get_current_head()
    log.warning(
        "the %s database is at revision %s, which this release (up to %s) does not know: a later"
        " release's. Its schema is left as it is: each release's revisions leave one that the"
        " release just before it runs on, no older one. If this release is further back, stop it"
        " and downgrade the database with the later release's image first"
        " (python -m shared.migrations downgrade %s %s)",
        service, ", ".join(later), head, service, head)


def _numbered_past(revision: str, head: str) -> bool:
    return (revision.isascii() and revision.isdigit() and head.isascii() and head.isdigit()
            and int(revision) > int(head))


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


class _EachRevisionInALine(logging.Filter):
    """alembic's lines as the command shows them: each revision it runs in one line, `Running
    upgrade 0001 -> 0002: ` (or `base -> 0001`, where alembic says ` -> 0001`) and the first
    paragraph of its docstring, where alembic wrote the paragraph as its file wraps it (the lines
    after the first with no level or name, taken for lines of their own); and none of its
    `Context impl PostgresqlImpl.` and `Will assume transactional DDL.`, said again each time it
    reads the database's revision (three times an upgrade)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if (record.msg == "Running %s" and isinstance(record.args, tuple)
                and len(record.args) == 1 and hasattr(record.args[0], "to_revisions_no_deps")):
            step = record.args[0]
            doc = " ".join((step.doc or "").split())
            record.msg = "Running %s %s -> %s" + (": %s" if doc else "")
            record.args = (step.name, _revisions_or_base(step.from_revisions_no_deps),
                           _revisions_or_base(step.to_revisions_no_deps), *([doc] if doc else []))
            return True
        return not record.msg.startswith(("Context impl ", "Will assume "))


def _revisions_or_base(revisions: tuple[str, ...]) -> str:
    return ", ".join(revisions) or "base"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.migrations", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("action", choices=["upgrade", "downgrade"])
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("revision", nargs="?",
                        help="the revision to go to (0012, head, head-1, -1, ...): upgrade: head"
                             " unless given, never one older than the database's; downgrade:"
                             " needed")
    args = parser.parse_args(argv)
    if args.action == "downgrade" and args.revision is None:
        parser.error("downgrade needs the revision to go down to")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.migration").addFilter(_EachRevisionInALine())
    # (Their `setting up autogenerate plugin ...`, six lines at each comparison of the schema with
    # the models, and `Detected added column ...`, each difference as what would be done about
    # it: the refusal names each in its own words, _refuse_a_schema_not_this_releases.)
    for comparing in ("alembic.runtime.plugins", "alembic.autogenerate"):
        logging.getLogger(comparing).setLevel(logging.WARNING)
    settings_or_exit(f"{args.service}: nothing migrated", log)  # (a database's URL, say)
    try:
        if args.action == "upgrade":
            upgrade(args.service, "head" if args.revision is None else args.revision)
        else:
            downgrade(args.service, args.revision)
    except (DatabaseUnreachable, ServerTooOld, NotTheServicesDatabase, UnknownRevision,
            NotAnUpgrade, ALaterReleasesToGoDown, UnreadableTarget, DowngradeRefused,
            UpgradeRefused, SchemaNotThisReleases, CommandError) as exc:
        # What the operator must put right, in a line; anything else keeps its traceback.
        log.error("%s", " ".join(str(exc).split()))
        raise SystemExit(1) from None


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
