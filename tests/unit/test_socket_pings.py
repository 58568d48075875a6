"""gateway_app.socket_pings.PingSchedule, on a clock of the test's own: the stream's turns, a
second apart (SOCKET_DRAIN_SECONDS), pings 25 s apart, 10 s for a pong."""

from __future__ import annotations

from gateway_app.socket_pings import PingSchedule

PING, PONG, TURN = 25.0, 10.0, 1.0


def _turns(schedule: PingSchedule, start: float, end: float,
           answered_at: float | None = None) -> float | None:
    """Run the stream's turns from `start` to `end`, a TURN apart, pinging as scheduled; the page
    answers the first ping `answered_at` s after it (never, if None). When the page was taken for
    gone; None if it was not."""
    now, pinged_at = start, None
    while now <= end:
        answered = (pinged_at is not None and answered_at is not None
                    and now >= pinged_at + answered_at)
        if schedule.page_gone(now, answered):
            return now
        if schedule.ping_due(now):
            schedule.pinged(now)
            pinged_at = now if pinged_at is None or answered else pinged_at
        now += TURN
    return None


def test_a_page_leaving_its_ping_unanswered_is_gone_once_its_pong_is_due():
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    assert _turns(schedule, 1.0, 60.0) == PING + PONG


def test_a_stall_longer_than_the_pong_bound_takes_no_page_for_gone_before_its_reader_has_run():
    """The process stopped (SIGSTOP, a VM frozen) 15 s with a ping out: the page's pong came
    meanwhile and sits unread, the socket's reader thread not having run yet at the first turn
    after it. That turn decides nothing (before, the page was taken for gone); the next, the
    pong read, keeps it. Stopped again as its pong was nearly due, the same."""
    for pinged_for in (0.0, PONG - 1):  # how long the ping was out when the process stopped
        schedule = PingSchedule(0.0, PING, PONG, TURN)
        assert _turns(schedule, 1.0, PING + pinged_for) is None
        assert not schedule.page_gone(PING + pinged_for + 15, pong_received=False)
        assert not schedule.page_gone(PING + pinged_for + 16, pong_received=True)
        assert schedule.pong_due is None


def test_a_page_still_silent_after_a_stall_is_gone_once_its_stall_free_wait_is_over():
    """The stall is not counted: a page that does not answer is gone once it has been waited
    for PONG s of the process running, and not much later."""
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    assert _turns(schedule, 1.0, PING + 4) is None  # its ping out 4 s
    stalled_until = PING + 4 + 15
    assert not schedule.page_gone(stalled_until, pong_received=False)
    gone_at = _turns(schedule, stalled_until + TURN, stalled_until + 30)
    assert gone_at is not None and stalled_until + 1 <= gone_at <= stalled_until + PONG - 2


def test_a_page_answering_each_ping_is_never_gone():
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    now = 1.0
    while now < 300:
        assert not schedule.page_gone(now, pong_received=schedule.pong_due is not None
                                      and now >= schedule.pong_due - PONG + 0.5)
        if schedule.ping_due(now):
            schedule.pinged(now)
        now += 0.5
