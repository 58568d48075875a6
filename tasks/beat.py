"""Beat's scheduler: Celery's own, but sending no task to a queue that already holds a few.

Beat sends its tasks (the relay's lead, the sweeper, the pruners) every second or two, whether or
not a worker reads them. With none reading (a service's workers stopped, or waiting on a migration
that failed), Redis would keep every one: the Redis transport has no expiry per message, a task's
`expires` is looked at only by the worker that takes it (and beat's carry none, celeryconfig.py:
the worker reads it on a clock of its own), and the queue would grow by some 7 MB an hour, for a
worker to drain, stale, when it came back. Each of these tasks only asks for what the
next one asks for again, so one not sent loses nothing.

It also follows the wall clock back. Celery's scheduler keeps each entry's last run, and its heap
of due times, by the wall clock: after a step back of an hour (a clock set right by NTP, a VM
restored), every entry would wait out the hour before it ran again, the relay's lead and the
sweeper with them. A last run later than now can only mean such a step, so the whole schedule is
moved back by as much.

And it renews beat's alive file at each tick while it reaches Redis, for its healthcheck
(tasks/alive.py).
"""

from __future__ import annotations

import logging

from celery.beat import PersistentScheduler
from celery.utils.time import maybe_make_aware

from tasks.alive import AliveFileScheduler
from tasks.inbox import tasks_waiting
from tasks.routing import route_to_service_queue

log = logging.getLogger(__name__)

# A queue holding this many tasks gets no more from beat until a worker has taken some.
BACKLOG_LIMIT = 10


class BoundedScheduler(AliveFileScheduler, PersistentScheduler):
    def tick(self, *args, **kwargs):
        self._follow_the_clock_back()
        return super().tick(*args, **kwargs)

    def _follow_the_clock_back(self) -> None:
        """Move every entry's last run back by as much as the latest lies ahead of now (how far
        the clock went back, less the time from that run to the step), keeping their spacing, and
        have the heap rebuilt from them."""
        entries = list(self.schedule.values())
        if not entries:
            return
        now = maybe_make_aware(self.app.now())
        ahead = max(maybe_make_aware(entry.last_run_at) for entry in entries) - now
        if ahead.total_seconds() <= 0:
            return
        log.warning("the wall clock went back by about %.0f s: the schedule goes back with it",
                    ahead.total_seconds())
        for entry in entries:
            entry.last_run_at = maybe_make_aware(entry.last_run_at) - ahead
        self._heap = None

    def apply_entry(self, entry, producer=None):
        queue = (route_to_service_queue(entry.task, entry.args, entry.kwargs, entry.options)
                 or {}).get("queue")
        if queue is not None and self._waiting(queue) >= BACKLOG_LIMIT:
            log.warning("not sending %s: %d or more tasks already wait in %s, unread (are its"
                        " workers running?)", entry.name, BACKLOG_LIMIT, queue)
            return
        super().apply_entry(entry, producer=producer)

    def _waiting(self, queue: str) -> int:
        """How many tasks wait in `queue`; 0 when Redis cannot say (the send then fails as it
        would). Either way the answer, or its absence, tells the alive file whether beat reaches
        Redis: a task not sent for the backlog is no failure."""
        try:
            waiting = tasks_waiting(queue)
        except Exception as exc:
            log.debug("cannot count the tasks waiting in %s: %r", queue, exc)
            self.note_broker_reached(False)
            return 0
        self.note_broker_reached(True)
        return waiting
