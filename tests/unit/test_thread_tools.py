"""OutcomeThread hands a test what its target returned or raised, and fails on a thread that
does not end."""

from __future__ import annotations

import threading

import pytest

from tests.thread_tools import OutcomeThread, all_joined


def test_joined_returns_what_the_target_returned():
    thread = OutcomeThread(lambda a, b: a + b, 1, 2)
    thread.start()
    assert thread.joined(10) == 3


def test_joined_raises_what_the_target_raised():
    def fail():
        raise ValueError("in the thread")

    thread = OutcomeThread(fail)
    thread.start()
    with pytest.raises(ValueError, match="in the thread"):
        thread.joined(10)


def test_joined_fails_on_a_thread_still_running():
    let_go = threading.Event()
    thread = OutcomeThread(let_go.wait, 10, name="waiting")
    thread.start()
    try:
        with pytest.raises(AssertionError, match="waiting still running"):
            thread.joined(0.1)
    finally:
        let_go.set()
    assert thread.joined(10) is True


def test_all_joined_waits_for_every_thread_before_raising_what_the_first_raised():
    ended = threading.Event()

    def fails():
        raise ValueError("the first")

    def ends_later():
        ended.wait(0.3)
        return "ended"

    later = OutcomeThread(ends_later)
    threads = [OutcomeThread(fails), later]
    for thread in threads:
        thread.start()
    with pytest.raises(ValueError, match="the first"):
        all_joined(threads, 10)
    assert not later.is_alive()  # (waited for, though the first had failed)
