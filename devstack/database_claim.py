"""A run's claim on the databases it names, held on their PostgreSQL for as long as it runs.

Two checkouts' `make run`s on one machine name the same databases unless told otherwise
(devstack.run_settings' HSESHOP_PREFIX), and on the machine's PostgreSQL they would share them:
each one's workers taking the other's orders, each one's migrations run under the other. So a run
holds a session advisory lock on that PostgreSQL, keyed on its names' prefix, on a connection of
its own named after the run (application_name), and a second run that cannot take it refuses to
start, naming the run that holds it. PostgreSQL lets go of the lock when the connection ends,
however the run ends (killed outright too).
"""

from __future__ import annotations

import os
from pathlib import Path

# The lock's first key (hashed by the server, with the prefix as its second): the claims of
# `make run`, apart from any other advisory lock (the relay's leader locks are one-key ones).
CLAIM_KIND = "hseshop make run"
# PostgreSQL keeps this many bytes of an application_name (NAMEDATALEN - 1).
APPLICATION_NAME_BYTES = 63
CONNECT_TIMEOUT_SECONDS = 5


class DatabasesInUse(RuntimeError):
    """Another run holds the claim on the databases this one names."""


class DatabaseClaim:
    """The claim, held on its open connection until `release`."""

    def __init__(self, connection):
        self._connection = connection

    @classmethod
    def take(cls, postgres_base: str, prefix: str, databases: list[str],
             checkout: str | os.PathLike) -> DatabaseClaim | None:
        """Claim `prefix`'s names on the PostgreSQL at `postgres_base` for the run of `checkout`
        (this process); DatabasesInUse, naming the run that holds it, if another does. None
        where that PostgreSQL lets no one in: the migrations then fail, saying why."""
        import psycopg2  # (as devstack.infra: only a run that claims needs it)

        try:
            connection = psycopg2.connect(f"{postgres_base}/postgres",
                                          application_name=holder_name(checkout),
                                          connect_timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg2.OperationalError:
            return None
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))",
                               (CLAIM_KIND, prefix))
                if cursor.fetchone()[0]:
                    return cls(connection)
                cursor.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                    " AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid"
                    " AND l.database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())",
                    (CLAIM_KIND, prefix))
                holder = cursor.fetchone()
        except BaseException:
            connection.close()
            raise
        connection.close()
        raise DatabasesInUse(
            f"the databases {', '.join(databases)} at {postgres_base} are in use by another"
            f" `make run` ({holder[0] if holder else 'one that has just ended'}): stop it, or"
            f" give this checkout names of its own: HSESHOP_PREFIX=<name> (README: The two"
            f" commands)")

    def release(self) -> None:
        """Let go of the claim (closing its connection); again, nothing."""
        self._connection.close()


def holder_name(checkout: str | os.PathLike) -> str:
    """The claim's connection's application_name: this process and its checkout (the path's end,
    where the whole will not fit)."""
    head = f"make run pid {os.getpid()} in "
    path = str(Path(checkout))
    room = APPLICATION_NAME_BYTES - len(head.encode())
    if len(path.encode()) > room:
        path = "..." + path.encode()[-(room - 3):].decode(errors="ignore")
    return head + path
