"""The outbox relay's leader: one connection per service database that holds the leader lock,
LISTENs on the channel the outbox trigger notifies, and runs the relay's statements.

A session-level advisory lock makes one relay per database the leader; a crashed one lets go with
its connection. Each commit that inserted outbox rows notifies once, after it is visible, so the
leader reads the rows as soon as they can be read and never polls an empty table. Relaying on the
very connection that holds the lock means a leader that loses its connection loses its lock and
its means to relay at the same moment, and each batch costs no pooled session and no transaction.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg2

from shared.db import driver_dsn
from shared.outbox.writing import OUTBOX_CHANNEL

# An arbitrary constant: the key of the advisory lock that makes one relay per database the leader.
RELAY_LEADER_LOCK_KEY = 0x0B0C5E1B
# A leader runs a statement at least every second (tasks/relay.py's RECHECK_SECONDS) and waits on
# the broker for a few more at worst. A session idle this long belongs to a leader that has stopped
# without closing it (its process paused, its host gone), and PostgreSQL ends it, lock and all, so
# another relay can lead; otherwise the lock would stay until TCP gave up on the host, hours on.
LEADER_IDLE_TIMEOUT_SECONDS = 30.0
# How long close() waits for the database to answer its unlock: a live one answers in a round
# trip. One silent for longer is given up on, and the connection closed without it, its lock left
# to the session's end as before the unlock was sent, so that a database gone silent holds a
# worker's stop (or a step-down) up for this long at most, not for the connection's timeouts
# (shared.db.CONNECTION_TIMEOUTS: about 30 s for a host cut off; for ever for one whose kernel
# still acknowledges, its server frozen). (Nothing tells a silent database beforehand: the
# driver finds a connection broken only once a statement on it has failed.) A live database slower
# than this (its CPU saturated, a packet sent again) is given up on alike: its lock is then free
# only as the server ends the session, and a relay asking meanwhile leaves the lead to beat's next.
UNLOCK_WAIT_SECONDS = 1.0

T = TypeVar("T")


class RelayLeaderConnection:
    """A connection to one service's database; `lead()` before waiting or relaying."""

    def __init__(self, database_url: str,
                 idle_timeout_seconds: float = LEADER_IDLE_TIMEOUT_SECONDS):
        self._connection = psycopg2.connect(driver_dsn(database_url))
        self._leads = False
        try:
            self._set_up(idle_timeout_seconds)
        except psycopg2.Error:
            self._connection.close()
            raise

    def _set_up(self, idle_timeout_seconds: float) -> None:
        # LISTEN, the session-level lock and each of the relay's statements stand alone.
        self._connection.autocommit = True
        with self._connection.cursor() as cursor:
            # (PostgreSQL 14 and later; production runs 17.)
            cursor.execute("SET idle_session_timeout = %s", (f"{idle_timeout_seconds * 1000:.0f}",))
            # The relay reads the oldest rows by walking the primary key, never by scanning the
            # table's pages and sorting: a table rows go through holds far more pages than rows
            # (sent rows are deleted and stay as dead versions until a VACUUM), and a planner
            # that costs the read by pages picks the scan, which then costs milliseconds a read.
            # This connection runs the relay's statements only, all of them by id.
            cursor.execute("SET enable_seqscan = off")
            # The read's cost, as the planner estimates it, grows with the rows it may have to
            # walk past (refused ones waiting, shared.outbox.relaying.CLAIM_ROWS), and past
            # jit_above_cost PostgreSQL compiles it first: 80 ms a read that otherwise takes 16.
            cursor.execute("SET jit = off")

    def lead(self) -> bool:
        """Become this database's leading relay, unless another relay is; then listen."""
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LEADER_LOCK_KEY,))
            if not cursor.fetchone()[0]:
                return False
            self._leads = True
            cursor.execute(f'LISTEN "{OUTBOX_CHANNEL}"')
        return True

    def wait(self, timeout: float) -> bool:
        """Block until outbox rows are committed or `timeout` seconds pass; True if woken."""
        connection = self._connection
        if not connection.notifies:
            readable, _, _ = select.select([connection], [], [], timeout)
            if readable:
                connection.poll()
        woken = bool(connection.notifies)
        connection.notifies.clear()
        return woken

    def cursor(self):
        """A cursor of the leader's connection (autocommit); use it in a `with` block, which
        closes it. (Notifications that arrive meanwhile are kept for the next wait().)"""
        return self._connection.cursor()

    def ask(self, question: Callable[..., T], *args) -> T:
        """`question(cursor, *args)` (one of shared.outbox.relaying's), on a cursor of its own."""
        with self.cursor() as cursor:
            return question(cursor, *args)

    def close(self) -> None:
        """End the session, the LISTEN and the lead with it; the lock is free once this returns,
        unless the database has stopped answering (it is then given up on within
        UNLOCK_WAIT_SECONDS, and the lock goes with the session as the server ends it).

        The session's end alone lets go of the lock only as the server gets to it, after the
        client has gone and once the session's own things are dropped (its temporary tables,
        say): a relay asking for the lock meanwhile found it taken, and returned without leading.
        So a leader lets go of the lock first, while its connection still answers. Called by the
        thread that uses the connection (a statement of another thread's under way would be the
        one cut off)."""
        try:
            if self._leads and not self._connection.closed:
                with (_cut_off_after(self._connection, UNLOCK_WAIT_SECONDS),
                      self._connection.cursor() as cursor):
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (RELAY_LEADER_LOCK_KEY,))
        except psycopg2.Error:
            pass
        finally:
            self._leads = False
            self._connection.close()

    def __enter__(self) -> RelayLeaderConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def _cut_off_after(connection, seconds: float) -> Iterator[None]:
    """Shut `connection`'s socket down if what runs inside has not ended within `seconds`: a
    statement waiting on a database gone silent then fails at once, as on a connection lost
    ("server closed the connection unexpectedly"), where libpq would wait for an answer until
    the kernel gave up on the connection.

    A deadline kept by the client, for nothing else bounds the wait: statement_timeout is the
    server's, which hears nothing; TCP's keepalives and tcp_user_timeout count silence of the
    peer's kernel only (a server whose host still acknowledges what it is sent, its process
    frozen or a proxy in between stuck, never trips them), and set short for the leader's whole
    connection would end its lead over a moment's loss on the network. psycopg2 has no deadline
    of its own: a blocking statement holds the connection's lock (so another thread cannot close
    it meanwhile), an asynchronous connection is one from its start, every statement polled, and
    its green mode (psycopg2.extensions.set_wait_callback) is the whole process's, every
    connection of the worker's threads.

    The socket is shut down through a descriptor of its own, taken before the wait: libpq closes
    its descriptor itself when a statement fails on a connection lost (its server restarted,
    say), and the number, free again, could be another connection's by the time the timer fires;
    ours keeps the socket open, so the shutdown can reach no other."""
    with socket.socket(fileno=os.dup(connection.fileno())) as ours:
        cutting = threading.Timer(seconds, _shut_down, args=(ours,))
        cutting.daemon = True
        cutting.start()
        try:
            yield
        finally:
            cutting.cancel()
            cutting.join()  # (a shutdown under way is over before the connection is closed)


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # (the connection already gone)
        pass
