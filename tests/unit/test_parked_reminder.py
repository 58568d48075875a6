"""The reminder of parked messages (shared/parked_reminder.py), shared by the outbox relay and the
inbox sweeper: when it counts and what it says (pure logic: a clock of the test's)."""

import logging

import pytest

from shared.parked_reminder import PARKED_REMINDER_SECONDS, ParkedReminder


def test_it_says_the_count_at_once_then_once_a_period_and_nothing_while_none_is_parked(caplog):
    now = [1000.0]
    counts = iter([3, 2, 0])
    reminder = ParkedReminder(logging.getLogger("test"), "orders inbox", "never handled",
                              "python -m tasks.parked list orders", clock=lambda: now[0])
    reminder.remind(lambda: next(counts))
    now[0] += PARKED_REMINDER_SECONDS - 1
    reminder.remind(lambda: pytest.fail("counted before it was due"))
    now[0] += 1
    reminder.remind(lambda: next(counts))
    now[0] += PARKED_REMINDER_SECONDS
    reminder.remind(lambda: next(counts))  # (none parked: nothing said)
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.ERROR, "orders inbox: 3 message(s) parked, never handled"
                        " (python -m tasks.parked list orders)"),
        (logging.ERROR, "orders inbox: 2 message(s) parked, never handled"
                        " (python -m tasks.parked list orders)")]


def test_a_count_that_fails_is_not_tried_again_before_the_next_period():
    now = [0.0]
    reminder = ParkedReminder(logging.getLogger("test"), "orders inbox", "never handled",
                              "python -m tasks.parked list orders", clock=lambda: now[0])

    def fails() -> int:
        raise ConnectionError("database away")

    with pytest.raises(ConnectionError):
        reminder.remind(fails)
    now[0] += 1
    reminder.remind(lambda: pytest.fail("counted again at once"))
