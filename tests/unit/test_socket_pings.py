"""gateway_app.socket_pings.PingSchedule, on a clock of the test's own: the stream's turns, a
look, then a wait of a second (SOCKET_DRAIN_SECONDS), then the turn's work; pings 25 s apart,
10 s for a pong."""

from __future__ import annotations

from gateway_app.socket_pings import PingSchedule

PING, PONG, TURN = 25.0, 10.0, 1.0


def _turns(schedule: PingSchedule, start: float, end: float, answered_at: float | None = None,
           work: float = 0.0, waits: dict[float, float] | None = None,
           works: dict[float, float] | None = None) -> float | None:
    """Run the stream's turns from `start` to `end`, pinging as scheduled; the page answers the
    first ping `answered_at` s after it (never, if None). Each look is followed by a wait of
    TURN (or waits[the look's time]: a stall), then `work` s of the loop's work (or
    works[the look's time]). When the page was taken for gone; None if it was not."""
    now, pinged_at = start, None
    while now <= end:
        answered = (pinged_at is not None and answered_at is not None
                    and now >= pinged_at + answered_at)
        if schedule.page_gone(now, answered):
            return now
        if schedule.ping_due(now):
            schedule.pinged(now)
            pinged_at = now if pinged_at is None or answered else pinged_at
        waited = (waits or {}).get(now, TURN)
        schedule.waited(now, now + waited)
        now += waited + (works or {}).get(now, work)
    return None


def test_a_page_leaving_its_ping_unanswered_is_gone_once_its_pong_is_due():
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    assert _turns(schedule, 1.0, 60.0) == PING + PONG


def test_a_stall_longer_than_the_pong_bound_takes_no_page_for_gone_before_its_reader_has_run():
    """The process stopped (SIGSTOP, a VM frozen) 15 s with a ping out, in the stream's wait:
    the page's pong came meanwhile and sits unread, the socket's reader thread not having run yet
    at the first look after it. That look decides nothing (before, the page was taken for gone);
    the next, the pong read, keeps it. Stopped again as its pong was nearly due, the same."""
    for pinged_for in (0.0, PONG - 1):  # how long the ping was out when the process stopped
        schedule = PingSchedule(0.0, PING, PONG, TURN)
        stopped_at = PING + pinged_for
        assert _turns(schedule, 1.0, stopped_at, waits={stopped_at: 15.0}) is None
        assert not schedule.page_gone(stopped_at + 15, pong_received=False)
        schedule.waited(stopped_at + 15, stopped_at + 16)
        assert not schedule.page_gone(stopped_at + 16, pong_received=True)
        assert schedule.pong_due is None


def test_a_page_still_silent_after_a_stall_is_gone_once_its_stall_free_wait_is_over():
    """The stall is not counted: a page that does not answer is gone once it has been waited
    for PONG s of the process running, and not much later."""
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    stopped_at = PING + 4  # its ping out 4 s
    assert _turns(schedule, 1.0, stopped_at, waits={stopped_at: 15.0}) is None
    stalled_until = stopped_at + 15
    assert not schedule.page_gone(stalled_until, pong_received=False)
    schedule.waited(stalled_until, stalled_until + TURN)
    gone_at = _turns(schedule, stalled_until + TURN, stalled_until + 30)
    assert gone_at is not None and stalled_until + 1 <= gone_at <= stalled_until + PONG - 2


def test_a_page_gone_is_found_under_a_load_that_lasts_each_turn_late_for_its_work():
    """Each turn's work (the table read, the sends, 200 threads waiting for the interpreter)
    takes 1.5 s, every look more than a wait and its slack after the last: each was taken for a
    stall, the pong put off at every one, and a page gone behind a proxy kept its thread for as
    long as the load lasted. Only the wait is measured: it is found within the ping's time, its
    pong's and three turns."""
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    work = 1.5
    gone_at = _turns(schedule, 1.0, 600.0, work=work)
    assert gone_at is not None and gone_at <= PING + PONG + 3 * (TURN + work)


def test_a_long_catch_up_with_a_ping_out_puts_its_pong_off_no_further_than_a_turn():
    """A catch-up of many pages (each read and sent, the token read again between, no wait)
    takes 60 s just after a ping: the look after it came 60 s late, and its lateness was added
    to the pong's due, the process running all along. It is excused, once, the due unmoved."""
    schedule = PingSchedule(0.0, PING, PONG, TURN)
    catch_up_after = PING + 1
    gone_at = _turns(schedule, 1.0, 200.0, works={catch_up_after: 60.0})
    assert gone_at == catch_up_after + TURN + 60 + TURN


def test_a_page_answering_each_ping_is_never_gone():
    for work in (0.0, 1.5):  # (a load making every turn late too)
        schedule = PingSchedule(0.0, PING, PONG, TURN)
        now = 1.0
        while now < 300:
            assert not schedule.page_gone(now, pong_received=schedule.pong_due is not None
                                          and now >= schedule.pong_due - PONG + 0.5)
            if schedule.ping_due(now):
                schedule.pinged(now)
            schedule.waited(now, now + TURN)
            now += TURN + work
