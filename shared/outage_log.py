"""What a loop that retries says of an outage it waits out (its database connection lost, its
offset commits failing): once as it begins, then once a reminder's interval on while it lasts, and
that it is over; never a line per failed try."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# While one outage lasts, what tries again and again says so this often.
OUTAGE_REMINDER_SECONDS = 60.0
# A try failing this long after the last one that did begins a new outage, though no try worked in
# between to say the last was over (a consumer whose partitions were taken away stores nothing,
# and so never says it is back; the relay tries every second and the sweeper every few seconds, a
# consumer every second, while one lasts).
NEW_OUTAGE_AFTER_SECONDS = 30.0


@dataclass(frozen=True)
class OutageWords:
    """What an OutageLog says, as %-templates of `what` (the loop), `said` (the failed try, in a
    line; for `over`, what the caller says of the try that worked, if anything), `seconds` (since
    the outage began) and `tries` (failed, so far)."""

    begun: str  # a WARNING (or at the level `failed` is given)
    still: str  # as `begun`, once a reminder's interval on
    over: str  # at INFO


class OutageLog:
    """Tells the log of one loop that retries that something it needs is away, in `words`: once as
    the outage begins and then every `remind_every` seconds while it lasts, never once per failed
    try, one WARNING line each, without a traceback (the shop gets over it by itself); and, at
    INFO, that it is over. (Tries in several threads may share one.)"""

    def __init__(self, logger: logging.Logger, what: str, words: OutageWords,
                 remind_every: float = OUTAGE_REMINDER_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._logger, self._what, self._words = logger, what, words
        self._remind_every, self._clock = remind_every, clock
        self._lock = threading.Lock()
        self._lost_since: float | None = None
        self._said_at = self._last_lost_at = 0.0
        self._failed_tries = 0

    def failed(self, said: str, level: int = logging.WARNING) -> None:
        """A try failed for the outage; `said`: how, in a line; said, if at all, at `level`."""
        with self._lock:
            now = self._clock()
            if (self._lost_since is not None
                    and now - self._last_lost_at >= NEW_OUTAGE_AFTER_SECONDS):
                self._lost_since = None  # (the last one ended unsaid: no try worked since)
                self._failed_tries = 0
            self._last_lost_at = now
            self._failed_tries += 1
            if self._lost_since is None:
                self._lost_since = self._said_at = now
                self._say(level, self._words.begun, said, now)
            elif now - self._said_at >= self._remind_every:
                self._said_at = now
                self._say(level, self._words.still, said, now)

    def back(self, said: str = "") -> None:
        """A try worked: the outage, if there was one, is over (`said`: how, for `words.over`)."""
        with self._lock:
            if self._lost_since is None:
                return
            self._say(logging.INFO, self._words.over, said, self._clock())
            self._lost_since = None
            self._failed_tries = 0

    def _say(self, level: int, template: str, said: str, now: float) -> None:
        self._logger.log(level, template, {"what": self._what, "said": said,
                                           "seconds": now - self._lost_since,
                                           "tries": self._failed_tries})
