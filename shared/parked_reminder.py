"""The reminder of parked messages: while any are parked in an outbox or an inbox, an ERROR line
says how many, and how to list them, at first and then every PARKED_REMINDER_SECONDS: the line
said as each is parked is a one-off, easily missed, and a parked message waits for an operator
(an outbox's holds back the later rows of its key; an inbox's is never handled, its order, say,
never paid for or moved on). The outbox relay's leader reminds of its outbox as it starts to lead
and then as it goes on (tasks/relay.py); the inbox sweeper of its inbox, once per process every
PARKED_REMINDER_SECONDS (tasks/inbox.py: with several workers sweeping, each of them says it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# How often the count of parked messages is said again while any stay parked.
PARKED_REMINDER_SECONDS = 300.0


class ParkedReminder:
    """Says how many of `where`'s messages are parked (`where`: "orders outbox", say), what that
    holds up (`holding_up`, said after the count), and the command that lists them, at most once
    every PARKED_REMINDER_SECONDS (read at each turn: a test shortens it), the first time at once;
    nothing while none is parked. Safe from several threads (sweeps of one service may overlap)."""

    def __init__(self, log: logging.Logger, where: str, holding_up: str, list_command: str,
                 clock: Callable[[], float] = time.monotonic):
        self._log, self._where, self._holding_up = log, where, holding_up
        self._list_command = list_command
        self._clock = clock
        self._counted_at: float | None = None  # when it last counted (clock); None: never
        self._lock = threading.Lock()

    def remind(self, count_parked: Callable[[], int]) -> None:
        """If a reminder is due, count the parked messages (`count_parked`) and say how many, if
        any. Due again PARKED_REMINDER_SECONDS on even if the count fails (its error is
        raised): the caller's next turn, seconds on, does not count again."""
        now = self._clock()
        with self._lock:
            if (self._counted_at is not None
                    and now - self._counted_at < PARKED_REMINDER_SECONDS):
                return
            self._counted_at = now
        parked = count_parked()
        if parked:
            self._log.error("%s: %d message(s) parked, %s (%s)", self._where, parked,
                            self._holding_up, self._list_command)
