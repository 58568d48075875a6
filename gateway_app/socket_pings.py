"""When a notification socket pings its page, and when it takes the page for gone: a ping left
unanswered past its bound. Decided on the times the stream's loop gives it, so that what it
decides can be followed on a clock of one's own."""

from __future__ import annotations

# How much later than its wait a turn of the stream's loop may come and still be a turn as any
# other: a read of the table, a send, a thread waiting for the interpreter. A turn later than
# that comes after the process was stopped (SIGSTOP, a VM frozen, the host asleep) or this thread
# was held: see PingSchedule.page_gone.
TURN_SLACK_SECONDS = 1.0


class PingSchedule:
    """A socket's pings and the pong owed to the first left unanswered.

    Pings go every `ping_seconds` whatever the stream sends: notifications acknowledged (by a
    proxy in front, say) say nothing of the page, so a socket sent one more often than that would
    never find its page gone. A ping is two bytes."""

    def __init__(self, now: float, ping_seconds: float, pong_seconds: float,
                 turn_seconds: float):
        self.ping_seconds, self.pong_seconds = ping_seconds, pong_seconds
        self.turn_allowance = turn_seconds + TURN_SLACK_SECONDS
        self.ping_at = now + ping_seconds
        self.pong_due: float | None = None  # while a ping's pong has not come
        self.last_turn = now

    def page_gone(self, now: float, pong_received: bool) -> bool:
        """Whether the page has left a ping unanswered past its due, at a turn of the stream at
        `now` (the pong seen since the ping, or not, as the socket's reader thread has read it).

        A turn that comes later than its wait allows decides nothing and its lateness is not
        counted: after the process was stopped longer than the bound, the page's pong may be
        waiting unread on the connection, the reader thread not having run yet, and the socket
        was closed as unanswered while its page was there (every quiet socket with a ping out at
        once, after a stall). The next turn decides, the reader having had a wait to read it."""
        late = now - self.last_turn - self.turn_allowance
        self.last_turn = now
        if self.pong_due is None:
            return False
        if pong_received:
            self.pong_due = None
            return False
        if late > 0:
            self.pong_due += late
            return False
        return now >= self.pong_due

    def ping_due(self, now: float) -> bool:
        """Whether a ping is to be sent at `now`; if so, the next is scheduled from it."""
        if now < self.ping_at:
            return False
        self.ping_at = now + self.ping_seconds
        return True

    def pinged(self, now: float) -> None:
        """A ping was sent at `now`: its pong is due `pong_seconds` on, unless one sent before is
        still unanswered (the pong is then due from that one)."""
        if self.pong_due is None:
            self.pong_due = now + self.pong_seconds
