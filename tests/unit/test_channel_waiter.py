"""gateway_app.channel_listener.Waiter: a socket's wake-ups, none lost between two waits."""

from __future__ import annotations

import threading
import time

from gateway_app.channel_listener import Waiter, _Subscription


class _PublishedAsTheWaitTimesOut(threading.Event):
    """A waiter's event on which a publish lands (the listener thread's wake) just as a wait on it
    has timed out, before the waiter goes on."""

    def __init__(self, waiter: Waiter):
        super().__init__()
        self._waiter, self._once = waiter, True

    def wait(self, timeout=None):
        woken = super().wait(timeout)
        if self._once and not woken:
            self._once = False
            self._waiter._wake()
        return woken


def test_a_publish_landing_as_a_wait_times_out_wakes_the_next_wait_at_once():
    """The wait cleared its event whether or not it had been woken: a publish landing between its
    timeout and the clear was wiped, and the socket saw the notification (or its sign-out) only
    at its recheck, SOCKET_RECHECK_SECONDS later."""
    waiter = Waiter("channel", _Subscription())
    waiter._woken = _PublishedAsTheWaitTimesOut(waiter)
    assert waiter.wait(0.01) is False
    started = time.monotonic()
    assert waiter.wait(5.0) is True
    assert time.monotonic() - started < 1.0


def test_a_wake_is_reported_once():
    """Woken, a wait clears what woke it: the next waits out its timeout."""
    waiter = Waiter("channel", _Subscription())
    waiter._wake()
    assert waiter.wait(5.0) is True
    assert waiter.wait(0.01) is False
