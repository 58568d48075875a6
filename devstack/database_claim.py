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
Each of its queries is bounded (a server frozen, or gone without a word, fails it in seconds), and
a backend of its own left holding the lock (its connection gone half-open: the client's end went,
the server's did not notice) is recognised as its own, ended and the lock taken again, not taken
for another run's.
"""

from __future__ import annotations

import enum
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
# The server is asked for the same of its end (options): a connection gone half-open (a laptop
# asleep, a network dropped) would leave its backend holding the lock for the OS's default ~2 h.
# statement_timeout bounds a query a live server is slow to answer.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 10_000,
              "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
                         " -c tcp_keepalives_count=3 -c tcp_user_timeout=10000"
                         " -c statement_timeout=5000"}
# A query on the claim's connection not answered in this long has its connection cut (the
# server frozen, SIGSTOP or `docker pause`: its kernel still acknowledges, so neither keepalives
# nor tcp_user_timeout, nor statement_timeout, which the server itself would have to count, end it).
QUERY_CUT_OFF_SECONDS = 5
# How long the end of a backend of the claim's own left holding the lock is waited for (within
# QUERY_CUT_OFF_SECONDS, the bound of the queries that take the lock).
STALE_BACKEND_END_MILLISECONDS = 2000


class DatabasesInUse(RuntimeError):
    """Another run holds the claim on the databases this one names."""


class _NoAnswer(Exception):
    """The PostgreSQL of a claim lets no one in (not running, starting up, refusing)."""


class _HolderUnseen(Exception):
    """The lock was held, twice over, by a backend the server no longer shows (each ending as it
    was looked for, or its holder not one of the server's backends): no run to name."""


class Kept(enum.Enum):
    """What a look at the claim (DatabaseClaim.keep) found."""

    HELD = "held on its connection"
    TAKEN_AGAIN = "its connection was gone, and the claim is taken again on a new one"
    OUT_OF_REACH = ("its connection is gone, and PostgreSQL does not answer (or the lock's holder"
                    " could not be seen, ending as it was looked for): no claim held")
    RELEASED = "let go of (the run stopping): not looked at any more"


class DatabaseClaim:
    """The claim (made by `take`), held on a connection of its own until `release`."""

    def __init__(self, postgres_base: str, prefix: str, databases: list[str],
                 checkout: str | os.PathLike):
        self._connection = None  # (while the lock is held on it)
        # The backend the lock was last taken on, (pid, backend_start): once its connection is
        # gone on this side, the one that may still hold it on the server's.
        self._backend: tuple[int, object] | None = None
        self._released = False
        self._state = threading.Lock()  # (release may come on another thread than keep's)
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
        except _HolderUnseen:
            holder = "one PostgreSQL no longer shows, ending as it was looked for: try again"
        if holder is not None:
            raise DatabasesInUse(
                f"{claim.what} are in use by another `make run` ({holder}): stop it, or give"
                f" this checkout names of its own: HSESHOP_PREFIX=<name> (README: The two"
                f" commands)")
        return claim

    def keep(self) -> Kept:
        """Make sure the claim is still held, in one query while it is: where its connection is
        gone (PostgreSQL restarted, the lock gone with it), take it again on a new one, or say
        PostgreSQL does not answer yet (the next look tries again; so too where the lock's
        holder could not be seen: _HolderUnseen). DatabasesInUse, naming the run that holds it,
        if another run took it meanwhile: this one must stop. Its queries are
        each cut off after QUERY_CUT_OFF_SECONDS (a frozen server), its connects after
        CONNECT_TIMEOUT_SECONDS; RELEASED once the claim is let go of."""
        import psycopg2

        if self._released:
            return Kept.RELEASED
        if (connection := self._connection) is not None:
            try:
                with _cut_off_after(connection), connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                return Kept.HELD
            except psycopg2.Error:
                self._drop(connection)
                if self._released:
                    return Kept.RELEASED
        try:
            holder = self._lock()
        except (_NoAnswer, _HolderUnseen):
            # (a holder unseen is most likely this run's own backend, ending as it was looked
            # for: its connection gone half-open, the server's keepalives giving up about when
            # the client's did)
            return Kept.OUT_OF_REACH
        if holder is not None:
            raise DatabasesInUse(
                f"{self.what} were claimed by another `make run` ({holder}) while this run's claim"
                f" was gone with its connection (PostgreSQL restarted): stopping this run, not to"
                f" share them; stop the other and start this again, or give one of them names of"
                f" its own: HSESHOP_PREFIX=<name> (README: The two commands)")
        return Kept.TAKEN_AGAIN

    def release(self) -> None:
        """Let go of the claim (closing its connection), at once, whatever a keep on another
        thread is waiting for (its query fails, and it takes the claim no more); again,
        nothing."""
        with self._state:
            self._released = True
            connection, self._connection = self._connection, None
        if connection is not None:
            _cut(connection)  # (close alone would wait for a query under way to end)
            connection.close()

    def _drop(self, connection) -> None:
        with self._state:
            if self._connection is connection:
                self._connection = None
        connection.close()

    def _lock(self) -> str | None:
        """Take the lock on a new connection, kept as the claim's (None); else the name of the
        run holding it (_HolderUnseen where none could be seen); _NoAnswer where PostgreSQL lets
        no one in. The claim's own backend still holding it (its connection gone half-open: the
        server has not noticed it gone) is ended and the lock taken: that backend is known by
        its pid and start, which no other backend, of this server or after a restart, shares
        (the application_name alone is the same for every claim of this process and checkout).
        Not ended in time, _NoAnswer: the next look tries again."""
        import psycopg2  # (as devstack.infra: only a run that claims needs it)

        try:
            connection = psycopg2.connect(f"{self.postgres_base}/postgres",
                                          application_name=holder_name(self._checkout),
                                          connect_timeout=CONNECT_TIMEOUT_SECONDS, **KEEPALIVES)
        except psycopg2.OperationalError as exc:
            raise _NoAnswer from exc
        connection.autocommit = True
        try:
            with _cut_off_after(connection), connection.cursor() as cursor:
                holder = self._try_lock(cursor)
                if holder is not None and holder[:2] == self._backend:
                    # Its own backend, its connection gone on this side only: ended, for the
                    # lock to be taken again (else the server would hold it for the backend
                    # till its keepalives gave up).
                    try:
                        cursor.execute("SELECT pg_terminate_backend(%s, %s)",
                                       (holder[0], STALE_BACKEND_END_MILLISECONDS))
                    except psycopg2.ProgrammingError as exc:  # (not the run's to end: a role)
                        raise _NoAnswer("its own backend, holding the lock, cannot be ended") \
                            from exc
                    holder = self._try_lock(cursor)
                    if holder is not None and holder[:2] == self._backend:
                        raise _NoAnswer("its own backend, holding the lock, does not end")
                if holder is None:
                    cursor.execute("SELECT pid, backend_start FROM pg_stat_activity"
                                   " WHERE pid = pg_backend_pid()")
                    backend = cursor.fetchone()
        except psycopg2.OperationalError as exc:  # (the server gone again meanwhile)
            connection.close()
            raise _NoAnswer from exc
        except BaseException:
            connection.close()
            raise
        if holder is not None:
            connection.close()
            return holder[2]
        with self._state:
            if not self._released:  # (else released while it was being taken: let go)
                self._connection, self._backend = connection, backend
                return None
        connection.close()
        return None

    def _try_lock(self, cursor) -> tuple[int, object, str] | None:
        """Take the lock on the cursor's connection (None); else the backend holding it:
        (its pid, its backend_start, its application_name). A holder the server no longer shows
        as it is looked for has ended between the try and the look (its lock let go of): this
        run's own backend, most likely, its connection gone half-open and the server's
        keepalives giving up as the lock is taken again. The lock is tried once more; its
        holder unseen again, _HolderUnseen (the next look tries again), not another run's."""
        for _ in range(2):
            cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))",
                           (CLAIM_KIND, self._prefix))
            if cursor.fetchone()[0]:
                return None
            cursor.execute(
                "SELECT a.pid, a.backend_start, a.application_name"
                " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                " AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid"
                " AND l.database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())",
                (CLAIM_KIND, self._prefix))
            if (holder := cursor.fetchone()) is not None:
                return holder
        raise _HolderUnseen


@contextmanager
def _cut_off_after(connection, seconds: float = QUERY_CUT_OFF_SECONDS) -> Iterator[None]:
    """The connection cut (_cut) if the block's queries are not over in `seconds`: a blocking
    psycopg2 query waits for an answer with no limit of its own. The block's query then fails
    (psycopg2.OperationalError), as on a connection gone; a block whose queries ended as the cut
    began fails so too, once the cut is over (its connection shut: not one to keep)."""
    over = threading.Lock()  # (held by whichever comes first: the block's end, or the cut)

    def cut() -> None:
        if over.acquire(blocking=False):
            _cut(connection)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    cut_begun = False
    try:
        yield
    finally:
        if over.acquire(blocking=False):
            timer.cancel()
        else:
            # The cut under way: over before the block's connection is kept as the claim's, or
            # closed (it would shut that down meanwhile). Joined, not waited for on `over`,
            # which is never let go of.
            cut_begun = True
            timer.join()
    if cut_begun:
        import psycopg2

        raise psycopg2.OperationalError(f"the connection was cut off after {seconds:g} s")


def _cut(connection) -> None:
    """Shut the connection's socket down, under libpq (which takes no lock for it): a query
    waiting on it fails at once."""
    import psycopg2

    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg2.InterfaceError):  # (closed already)
        pass


def holder_name(checkout: str | os.PathLike) -> str:
    """The claim's connection's application_name: this process and its checkout (the path's end,
    where the whole will not fit)."""
    head = f"make run pid {os.getpid()} in "
    path = str(Path(checkout))
    room = APPLICATION_NAME_BYTES - len(head.encode())
    if len(path.encode()) > room:
        path = "..." + path.encode()[-(room - 3):].decode(errors="ignore")
    return head + path
