"""Clocks for tests: a worker's clock that runs behind (or ahead of) the database's, for tests of
which clock a timestamp is; rate-limit windows a test does not outlast."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest

# How long a test that counts requests against a rate limit may take, its servers and a loaded
# machine included, and still end in the window it began in.
RATE_LIMITED_TEST_SECONDS = 600


def running_off_by(offset: timedelta) -> type[datetime]:
    """datetime, but now() and utcnow() `offset` off: put in place of a module's `datetime`."""

    class RunningOff(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + offset

        @classmethod
        def utcnow(cls):
            return datetime.utcnow() + offset

    return RunningOff


AnHourBehind = running_off_by(-timedelta(hours=1))

# The modules that write the inbox's times or measure by them, the sweeper's, the replay's and the
# pruner's tasks included: each reads this process's clock through its `datetime`, if at all.
_INBOX_CLOCK_READERS = ("shared.inbox.model", "shared.inbox.handling", "shared.inbox.sweeping",
                        "shared.inbox.parked", "tasks.inbox", "tasks.parked", "tasks.retention")


@contextmanager
def inbox_clock_off_by(offset: timedelta) -> Iterator[None]:
    """This process's clock, as the inbox's modules and tasks read it, `offset` off the
    database's, for as long as the block runs: a worker (or sweeper) whose clock runs ahead or
    behind."""
    with pytest.MonkeyPatch.context() as patch:
        for module in _INBOX_CLOCK_READERS:
            patch.setattr(f"{module}.datetime", running_off_by(offset))
        yield


def rate_limit_windows_the_test_ends_in(monkeypatch) -> int:
    """Set the gateway's rate-limit windows (gateway_app.ratelimit.WINDOW_SECONDS) to whole seconds,
    an hour at most, such that the window running now has RATE_LIMITED_TEST_SECONDS left at least;
    returns their length. Windows are counted from the epoch, so an hour's, as the tests set
    before, still ended within a test's seconds now and then, and what the test had counted began
    again from nothing (a ticket asked for after its address's handshakes was given, not refused
    429). Whole seconds: the limiter's keys expire with their window (EXPIRE takes no fraction);
    an hour at most: a Retry-After stays within what the tests allow of it."""
    now = time.time()
    seconds = next((window for window in range(3600, 1800, -1)
                    if window - now % window >= RATE_LIMITED_TEST_SECONDS), None)
    assert seconds is not None, "no window of 30 to 60 minutes has 10 of them left"
    monkeypatch.setattr("gateway_app.ratelimit.WINDOW_SECONDS", seconds)
    return seconds
