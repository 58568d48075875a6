"""Beat's scheduler: Celery's own, but sending no task to a queue that already holds a few.

Beat sends its tasks (the relay's lead every second, the sweeper every few, the pruners) whether
or not a worker reads them. With none reading (a service's workers stopped, or waiting on a
migration that failed), Redis would keep every one: the Redis transport has no expiry per message,
a task's `expires` is looked at only by the worker that takes it (and beat's carry none,
celeryconfig.py: the worker reads it on a clock of its own), and the queue would grow by some 4 MB
an hour (a task is about 1 KB), for a worker to drain, stale, when it came back. Each of these
tasks only asks for what the next one asks for again, so one not sent loses nothing.

It also follows the wall clock back. Celery's scheduler keeps each entry's last run, and its heap
of due times, by the wall clock: after a step back of an hour (a clock set right by NTP, a VM
restored), every entry would wait out the hour before it ran again, the relay's lead and the
sweeper with them. A last run later than now can only mean such a step, so the whole schedule is
moved back by as much.

Beat first runs an entry it has no record of within FIRST_RUN_WITHIN (or its own interval, if
shorter: the relay's lead and the sweeper start as they did). Celery dates such an entry's last run
now, so it is first due a whole interval on: with a new schedule file (a fresh volume, `docker
compose down -v`, a beat recreated without its volume; or a file Celery empties itself, corrupt or
after a change of `timezone` or `enable_utc`) the pruners would wait an hour for their first run,
and a beat recreated more often than that would never prune; an entry new to a release likewise.
An entry the file records keeps its last run, so a beat restarted with its file sends no prunes but
those that fell due while it was away.

An entry not sent, for the backlog or because the queues were unreachable (Redis away), is tried
again as soon (not one whose send failed otherwise: it would fail again). Celery's tick dates an
entry's run (`reserve`) before it sends it, so a prune not sent would wait out its hour; it gets
back the last run it had, but due again within FIRST_RUN_WITHIN, not at once: a queue holding
BACKLOG_LIMIT tasks, or a Redis refusing connections, is no reason to ask again at every tick. The
relay's lead and the sweeper, due again within their interval anyway, keep Celery's date.

With Redis refusing connections, an entry due costs beat about 0.6 s: its count of the queue
connects once more at once and gives up, within milliseconds
(shared.celery_settings.QUEUE_COUNT_RETRY_POLICY: kombu's connecting took 6 s), and its send, as
every publish, tries again for about 0.6 s before it gives up (PUBLISH_RETRY_POLICY), riding out a
blip.

And it renews beat's alive file at each tick while it reaches Redis, for its healthcheck
(tasks/alive.py).

As it starts, it warns if it checks that a relay leads each outbox less often than once a second
(OUTBOX_RELAY_INTERVAL_SECONDS above shared.config.RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS): a
dead leader then goes unreplaced for longer than the relay's safety net allows.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery.beat import PersistentScheduler
from celery.schedules import schedule
from celery.utils.time import maybe_make_aware

from shared.config import RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS
from shared.task_queues import QUEUES_UNREACHABLE
from tasks.alive import AliveFileScheduler, send_failure
from tasks.inbox import tasks_waiting
from tasks.relay import relay_outbox
from tasks.routing import route_to_service_queue

log = logging.getLogger(__name__)

# A queue holding this many tasks gets no more from beat until a worker has taken some.
BACKLOG_LIMIT = 10

# An entry beat has no record of, or one not sent for the backlog or the queues being unreachable,
# is due (again) this soon, or after its own interval if shorter.
FIRST_RUN_WITHIN = timedelta(seconds=10)


class BoundedScheduler(AliveFileScheduler, PersistentScheduler):
    def setup_schedule(self):
        super().setup_schedule()
        _warn_of_a_relay_lead_checked_too_seldom(self.schedule.values())

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

    def merge_inplace(self, b):
        """Celery's merge of the configured schedule (`b`) into the one its file recorded, each
        entry new to it then dated back to be first due within FIRST_RUN_WITHIN."""
        recorded = set(self.schedule)
        super().merge_inplace(b)
        for name in set(self.schedule) - recorded:
            _run_first_soon(self.schedule[name])

    def apply_entry(self, entry, producer=None):
        queue = (route_to_service_queue(entry.task, entry.args, entry.kwargs, entry.options)
                 or {}).get("queue")
        if queue is not None and self._waiting(queue) >= BACKLOG_LIMIT:
            log.warning("not sending %s: %d or more tasks already wait in %s, unread (are its"
                        " workers running?)", entry.name, BACKLOG_LIMIT, queue)
            self._try_again_soon(entry)
            return
        super().apply_entry(entry, producer=producer)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        """Celery's send, an entry whose send failed for the queues being unreachable (Redis
        away) due again soon as one not sent for the backlog is: Celery logs the failure and goes
        on, the entry dated as sent. Any other failure leaves the entry as Celery dated it: a send
        that can never succeed (arguments that cannot be serialized, say) is tried again an
        interval on, not every FIRST_RUN_WITHIN with a traceback each time, and a task sent is not
        sent again because the schedule file's sync after it failed (_send_failed_unreachable)."""
        try:
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        except Exception as exc:
            if _send_failed_unreachable(exc):
                self._try_again_soon(entry)
            raise

    def _try_again_soon(self, entry) -> None:
        """Give the entry in the schedule (the one Celery's tick put there as it reserved `entry`:
        its last run now) `entry`'s last run and run count back, but no further back than to be
        due again within FIRST_RUN_WITHIN, and have the heap rebuilt: the tick queued its next
        run an interval on. An entry due as soon anyway is left as Celery dated it."""
        if not _runs_less_often_than(entry, FIRST_RUN_WITHIN):
            return
        reserved = self.schedule.get(entry.name)
        if reserved is None:
            return
        due_again_soon = (maybe_make_aware(self.app.now())
                          - (entry.schedule.run_every - FIRST_RUN_WITHIN))
        reserved.last_run_at = max(maybe_make_aware(entry.last_run_at), due_again_soon)
        reserved.total_run_count = entry.total_run_count
        self._heap = None

    def _waiting(self, queue: str) -> int:
        """How many tasks wait in `queue`; 0 when Redis cannot say (the send then fails as it
        would: tasks_waiting fails fast). Either way the answer, or the failure (if it says,
        tasks.alive's note_failed_call), tells the alive file whether beat reaches Redis: a task
        not sent for the backlog is no failure."""
        try:
            waiting = tasks_waiting(queue)
        except Exception as exc:
            log.debug("cannot count the tasks waiting in %s: %r", queue, exc)
            self.note_failed_call(exc)
            return 0
        self.note_broker_reached(True)
        return waiting


def _send_failed_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, out of Celery's Scheduler.apply_async, says that the send failed for the
    queues being unreachable (shared.task_queues.QUEUES_UNREACHABLE), not for a sync of the
    schedule file failing after it (tasks.alive.send_failure)."""
    return isinstance(send_failure(exc), QUEUES_UNREACHABLE)


def _warn_of_a_relay_lead_checked_too_seldom(entries) -> None:
    """Say in a WARNING if the relay's entries among `entries` run less often than
    RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS (OUTBOX_RELAY_INTERVAL_SECONDS, which sets them, above
    it)."""
    slowest = max((entry.schedule.run_every.total_seconds() for entry in entries
                   if entry.task == relay_outbox.name and isinstance(entry.schedule, schedule)),
                  default=0.0)
    if slowest > RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS:
        log.warning("OUTBOX_RELAY_INTERVAL_SECONDS=%g: beat checks that a relay leads each outbox"
                    " only every %g s, so a relay leader that dies goes unreplaced that long; the"
                    " relay's safety net is to run at least every %g s (the default)", slowest,
                    slowest, RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS)


def _run_first_soon(entry) -> None:
    """Date back the last run Celery gave a new entry (now) by all of its interval but
    FIRST_RUN_WITHIN. An interval's only: any other schedule (a crontab, a solar event) is left to
    its own time, defensively, as the shop has none."""
    if _runs_less_often_than(entry, FIRST_RUN_WITHIN):
        entry.last_run_at -= entry.schedule.run_every - FIRST_RUN_WITHIN


def _runs_less_often_than(entry, period: timedelta) -> bool:
    """Whether `entry` runs at an interval (not a crontab's or a solar event's times) longer than
    `period`."""
    return isinstance(entry.schedule, schedule) and entry.schedule.run_every > period
