"""When a notification socket pings its page, and when it takes the page for gone: a ping left
unanswered past its bound. Decided on the times the stream's loop gives it, so that what it
decides can be followed on a clock of one's own."""

from __future__ import annotations

# How much longer than asked the stream's wait for a wake-up may take and still be a wait as any
# other (the thread waiting for the interpreter, among a process's 200 sockets). A wait longer
# than that spans a stall: the process stopped (SIGSTOP, a VM frozen, the host asleep) or this
# thread held: see PingSchedule.waited.
TURN_SLACK_SECONDS = 1.0


class PingSchedule:
    """A socket's pings and the pong owed to the first left unanswered.

    Pings go every `ping_seconds` whatever the stream sends: notifications acknowledged (by a
    proxy in front, say) say nothing of the page, so a socket sent one more often than that would
    never find its page gone. A ping is two bytes."""

    def __init__(self, now: float, ping_seconds: float, pong_seconds: float,
                 wait_seconds: float):
        self.ping_seconds, self.pong_seconds = ping_seconds, pong_seconds
        self.wait_allowance = wait_seconds + TURN_SLACK_SECONDS
        self.ping_at = now + ping_seconds
        self.pong_due: float | None = None  # while a ping's pong has not come
        self.last_look = now
        self.stalled = False  # a wait has spanned a stall since the last look
        self.late_look_excused = False  # (one a ping, a look late but for no stall)

    def waited(self, began: float, ended: float) -> None:
        """The stream's loop waited for a wake-up (`wait_seconds` at most) from `began` to
        `ended`. A wait longer than its allowance spanned a stall (the process stopped, a VM
        frozen): what it overran by is not counted against the pong, and the next look decides
        nothing, the socket's reader thread, stopped too, having yet to read a pong that came
        meanwhile. Only the wait is measured: the loop's work (the table read, the sends, the
        catch-up's pages) may take long under load, and, counted, would put the pong off for as
        long as the load lasted."""
        overrun = ended - began - self.wait_allowance
        if overrun > 0:
            self.stalled = True
            if self.pong_due is not None:
                self.pong_due += overrun

    def page_gone(self, now: float, pong_received: bool) -> bool:
        """Whether the page has left a ping unanswered past its due, at a look of the stream at
        `now` (the pong seen since the ping, or not, as the socket's reader thread has read it).

        A look after a stall (see waited) decides nothing: after the process was stopped longer
        than the bound, the page's pong may be waiting unread on the connection, and the socket
        was closed as unanswered while its page was there (every quiet socket with a ping out at
        once, after a stall). The next look decides, the reader having had a wait to read it. A
        look later than a wait allows for another reason (a stall in the loop's work, a long
        catch-up) decides nothing either, once a ping: its lateness is not added to the due."""
        late = now - self.last_look > self.wait_allowance
        stalled, self.stalled, self.last_look = self.stalled, False, now
        if self.pong_due is None:
            return False
        if pong_received:
            self.pong_due = None
            return False
        if stalled:
            return False
        if late and not self.late_look_excused:
            self.late_look_excused = True
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
            self.late_look_excused = False
