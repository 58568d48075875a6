"""Clocks for tests: a worker's clock that runs behind the database's, for tests of which clock a
timestamp is; rate-limit windows a test does not outlast."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

# How long a test that counts requests against a rate limit may take, its servers and a loaded
# machine included, and still end in the window it began in.
RATE_LIMITED_TEST_SECONDS = 600


class AnHourBehind(datetime):
    """datetime, but now() and utcnow() an hour early: put in place of a module's `datetime`."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) - timedelta(hours=1)

    @classmethod
    def utcnow(cls):
        return datetime.utcnow() - timedelta(hours=1)


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
