"""Waking the outbox relay through PostgreSQL: LISTEN on the channel the outbox trigger notifies.

A relay that leads holds a connection of its own that LISTENs on OUTBOX_CHANNEL and holds a
session-level advisory lock, so one relay per database leads at a time and a crashed one lets go
with its connection. Each commit that inserted outbox rows notifies once, after it is visible, so
the relay reads the rows as soon as they can be read and never polls an empty table.
"""

from __future__ import annotations

import select

import psycopg2

from shared.db import driver_dsn
from shared.outbox import OUTBOX_CHANNEL

# An arbitrary constant, apart from shared.outbox.RELAY_LOCK_KEY (taken per batch).
RELAY_LEADER_LOCK_KEY = 0x0B0C5E1B


class OutboxWakeups:
    """A LISTENing connection to one service's database; `lead()` before waiting."""

    def __init__(self, database_url: str):
        self._connection = psycopg2.connect(driver_dsn(database_url))
        self._connection.autocommit = True

    def lead(self) -> bool:
        """Become this database's leading relay, unless another relay is; then listen."""
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LEADER_LOCK_KEY,))
            if not cursor.fetchone()[0]:
                return False
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

    def close(self) -> None:
        self._connection.close()  # the lock and the LISTEN end with the session

    def __enter__(self) -> OutboxWakeups:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
