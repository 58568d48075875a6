"""A run's claim on the databases it names, held on their PostgreSQL for as long as it runs.

Two checkouts' `make run`s on one machine name the same databases unless told otherwise
(devstack.run_settings' HSESHOP_PREFIX), and on the machine's PostgreSQL they would share them:
each one's workers taking the other's orders, each one's migrations run under the other. So a run
holds a session advisory lock on that PostgreSQL, keyed on its names' prefix, on a connection of
its own named after the run (application_name), and a second run that cannot take it refuses to
start, naming the run that holds it. PostgreSQL lets go of the lock when the connection ends,
however the run ends (killed outright too).

It lets go of it too when the server restarts under a running run, which nothing else would
notice: the run keeps its claim (`keep`, every few seconds: devstack.supervision), taking it
again on a new connection once the server answers, and stops if another run took it meanwhile.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

# The lock's first key (hashed by the server, with the prefix as its second): the claims of
# `make run`, apart from any other advisory lock (the relay's leader locks are one-key ones).
CLAIM_KIND = "hseshop make run"
# PostgreSQL keeps this many bytes of an application_name (NAMEDATALEN - 1).
APPLICATION_NAME_BYTES = 63
CONNECT_TIMEOUT_SECONDS = 5
# The claim's connection is idle but for keep's look: TCP keepalives (after 5 s idle, every 2 s,
# 3 unanswered) and a 10 s bound on unacknowledged data have libpq notice a server gone without a
# word (a machine or a network gone), so that a look at the claim fails in seconds, not hangs.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 10_000}


class DatabasesInUse(RuntimeError):
    """Another run holds the claim on the databases this one names."""


class _NoAnswer(Exception):
    """The PostgreSQL of a claim lets no one in (not running, starting up, refusing)."""


class Kept(enum.Enum):
    """What a look at the claim (DatabaseClaim.keep) found."""

    HELD = "held on its connection"
    TAKEN_AGAIN = "its connection was gone, and the claim is taken again on a new one"
    OUT_OF_REACH = "its connection is gone, and PostgreSQL does not answer: no claim held"


class DatabaseClaim:
    """The claim (made by `take`), held on a connection of its own until `release`."""

    def __init__(self, postgres_base: str, prefix: str, databases: list[str],
                 checkout: str | os.PathLike):
        self._connection = None  # (while the lock is held on it)
        self.postgres_base = postgres_base
        self._prefix = prefix
        self._databases = databases
        self._checkout = checkout

    @property
    def what(self) -> str:
        """The databases claimed, and where: `the databases a, b at postgresql://...`."""
        return f"the databases {', '.join(self._databases)} at {self.postgres_base}"

    @classmethod
    def take(cls, postgres_base: str, prefix: str, databases: list[str],
             checkout: str | os.PathLike) -> DatabaseClaim | None:
        """Claim `prefix`'s names on the PostgreSQL at `postgres_base` for the run of `checkout`
        (this process); DatabasesInUse, naming the run that holds it, if another does. None
        where that PostgreSQL lets no one in: the migrations then fail, saying why."""
        claim = cls(postgres_base, prefix, databases, checkout)
        try:
            holder = claim._lock()
        except _NoAnswer:
            return None
        if holder is not None:
            raise DatabasesInUse(
                f"{claim.what} are in use by another `make run` ({holder}): stop it, or give"
                f" this checkout names of its own: HSESHOP_PREFIX=<name> (README: The two"
                f" commands)")
        return claim

    def keep(self) -> Kept:
        """Make sure the claim is still held, in one query while it is: where its connection is
        gone (PostgreSQL restarted, the lock gone with it), take it again on a new one, or say
        PostgreSQL does not answer yet (the next look tries again). DatabasesInUse, naming the
        run that holds it, if another run took it meanwhile: this one must stop."""
        import psycopg2

        if self._connection is not None:
            try:
                with self._connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                return Kept.HELD
            except psycopg2.Error:
                self.release()
        try:
            holder = self._lock()
        except _NoAnswer:
            return Kept.OUT_OF_REACH
        if holder is not None:
            raise DatabasesInUse(
                f"{self.what} were claimed by another `make run` ({holder}) while this run's claim"
                f" was gone with its connection (PostgreSQL restarted): stopping this run, not to"
                f" share them; stop the other and start this again, or give one of them names of"
                f" its own: HSESHOP_PREFIX=<name> (README: The two commands)")
        return Kept.TAKEN_AGAIN

    def release(self) -> None:
        """Let go of the claim (closing its connection); again, nothing."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _lock(self) -> str | None:
        """Take the lock on a new connection, kept as the claim's (None); else the name of the
        run holding it (or of one that has just ended); _NoAnswer where PostgreSQL lets no one
        in."""
        import psycopg2  # (as devstack.infra: only a run that claims needs it)

        try:
            connection = psycopg2.connect(f"{self.postgres_base}/postgres",
                                          application_name=holder_name(self._checkout),
                                          connect_timeout=CONNECT_TIMEOUT_SECONDS, **KEEPALIVES)
        except psycopg2.OperationalError as exc:
            raise _NoAnswer from exc
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))",
                               (CLAIM_KIND, self._prefix))
                if cursor.fetchone()[0]:
                    self._connection = connection
                    return None
                cursor.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                    " AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid"
                    " AND l.database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())",
                    (CLAIM_KIND, self._prefix))
                holder = cursor.fetchone()
        except psycopg2.OperationalError as exc:  # (the server gone again meanwhile)
            connection.close()
            raise _NoAnswer from exc
        except BaseException:
            connection.close()
            raise
        connection.close()
        return holder[0] if holder else "one that has just ended"


def holder_name(checkout: str | os.PathLike) -> str:
    """The claim's connection's application_name: this process and its checkout (the path's end,
    where the whole will not fit)."""
    head = f"make run pid {os.getpid()} in "
    path = str(Path(checkout))
    room = APPLICATION_NAME_BYTES - len(head.encode())
    if len(path.encode()) > room:
        path = "..." + path.encode()[-(room - 3):].decode(errors="ignore")
    return head + path
