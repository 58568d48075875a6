"""A Celery process's sign of life for its healthcheck: a file whose modification time the process
renews while it does its work: a worker's consumer event loop every few seconds, beat's scheduler
at each of its ticks.

`celery inspect ping`, the healthcheck before, starts a whole Celery client each time (about a
CPU-second) to ask the process over Redis. Reading a file's age costs next to nothing, and means
more than the ping did:

- A worker renews it from a timer of the consumer's event loop (with the Redis broker the worker
  runs one: its timers fire from the loop that reads the queues). A worker that lost Redis (its
  consumer's steps stopped while it reconnects) removes the file at once; a loop that is stuck
  leaves it to age, and so does a worker with an inbox handler task hung (tasks/hung_tasks.py:
  the worker ends for it within a second or so; the file is not renewed meanwhile).
- Beat renews it at the end of each pass of its scheduler (`tick`, which sends what is due), while
  it reaches Redis. Beat is no worker: its signs of life are that its scheduler goes round and
  that what it sends reaches Redis. It ticks whenever an entry of its schedule is due, and at
  least every beat_max_loop_interval (celeryconfig.py: ALIVE_FILE_RENEW_EVERY_SECONDS) whatever
  the schedule holds; from a send that could not connect (Redis gone, or not answering) to the
  next that does, and through a tick held up, the file is left to age, and beat removes it as it
  stops. A send that failed otherwise (Redis's error reply, arguments that cannot be serialized)
  is no sign of Redis being away (AliveFileScheduler).

Either way the healthcheck fails once the file is gone or older than ALIVE_WITHIN_SECONDS, and a
file left by a process killed outright is removed as the next one starts. Started with
`--alive-file PATH` (a worker's or beat's option); without it, nothing is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from celery import bootsteps
from celery.beat import Scheduler, SchedulingError
from click import Option

from shared.celery_settings import ALIVE_FILE_RENEW_EVERY_SECONDS
from shared.task_queues import redis_reached
from tasks.hung_tasks import a_task_hung

log = logging.getLogger(__name__)

# How old the file may be for the process to count as alive (docker-compose.yml's healthchecks):
# several renewals missed, not one late.
ALIVE_WITHIN_SECONDS = 30

# Where beat's `--alive-file` leaves its path for the scheduler (beat passes its scheduler no
# option of its own): a setting of the app's, as the option is read.
BEAT_ALIVE_FILE_SETTING = "hseshop_beat_alive_file"


class AliveFile:
    """The file at `path`: one left by a process killed outright (SIGKILL, the OOM killer: no
    stop) is removed at once, since a container restarted with its /tmp would read the next
    process healthy on it while that one starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)

    def renew(self) -> None:
        try:
            self.path.touch()  # (an existing file's times set to now)
        except OSError as exc:  # a full or read-only disk: the healthcheck will say so
            log.warning("could not renew the alive file %s: %s", self.path, exc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def alive_file_option(renewed_by: str, callback=None) -> Option:
    return Option(["--alive-file"], default=None, callback=callback,
                  help=f"Renew this file's modification time from {renewed_by}, for a "
                       "healthcheck to read its age.")


def worker_alive_file_option() -> Option:
    return alive_file_option("the worker's event loop, every few seconds")


def beat_alive_file_option() -> Option:
    return alive_file_option("beat's scheduler, at each of its ticks",
                             callback=_keep_for_beats_scheduler)


def _keep_for_beats_scheduler(ctx, param, value):
    if value:
        ctx.obj.app.conf[BEAT_ALIVE_FILE_SETTING] = value
    return value


class AliveFileStep(bootsteps.StartStopStep):
    """A worker's consumer step: renews the alive file from the consumer's timer while the
    consumer runs (after its queues are consumed), and removes it as the consumer stops."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c, alive_file=None, **kwargs):
        super().__init__(c, **kwargs)
        self.file = AliveFile(alive_file) if alive_file else None
        self.renewal = None

    def include_if(self, c) -> bool:
        return self.file is not None

    def start(self, c) -> None:
        self.file.renew()
        self.renewal = c.timer.call_repeatedly(ALIVE_FILE_RENEW_EVERY_SECONDS,
                                               self._renew_unless_hung)

    def _renew_unless_hung(self) -> None:
        # The event loop goes round whatever the pool's threads do: a handler task hung is no
        # sign of life (the worker ends for it: tasks/hung_tasks.py).
        if not a_task_hung():
            self.file.renew()

    def stop(self, c) -> None:
        if self.renewal is not None:
            self.renewal.cancel()
            self.renewal = None
        # Gone at once rather than left to age: a worker reconnecting to Redis is not working.
        self.file.remove()

    shutdown = terminate = stop


class AliveFileScheduler(Scheduler):
    """Beat's scheduler (to be mixed in before Celery's PersistentScheduler): renews the alive
    file after each tick while beat reaches its broker, and removes it as beat stops (`close`).

    Celery's scheduler logs a send that failed ("Message Error", with its traceback) and goes on
    ticking, so a tick alone says nothing of Redis: through an outage beat would go on ticking, and
    renewing. Whether beat reaches its broker is what its last send (or a subclass's other call to
    the broker, `note_broker_reached`, `note_failed_call`) found, and stays so over the ticks that
    send nothing, until the next one: the file ages from a send that could not connect to the next
    that does. Only a failure to connect counts against it (shared.task_queues.redis_reached):
    Redis's error reply (out of memory, say) comes from a Redis reached, a send that fails before
    it gets to Redis (arguments that cannot be serialized) says nothing of it, and a send that
    went through counts as reached though the schedule file's sync after it failed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = self.app.conf.get(BEAT_ALIVE_FILE_SETTING)
        self.alive_file = AliveFile(path) if path else None
        self.broker_reached = True

    def note_broker_reached(self, reached: bool) -> None:
        self.broker_reached = reached

    def note_failed_call(self, failure: BaseException) -> None:
        """Note what a call to the broker that failed with `failure` says of whether beat
        reaches it, if anything."""
        reached = redis_reached(failure)
        if reached is not None:
            self.note_broker_reached(reached)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        try:
            result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        except Exception as exc:
            failure = send_failure(exc)
            if failure is None:
                self.note_broker_reached(True)
            else:
                self.note_failed_call(failure)
            raise
        self.note_broker_reached(True)
        return result

    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        if self.alive_file is not None and self.broker_reached:
            self.alive_file.renew()
        return interval

    def close(self) -> None:
        # Gone even if closing fails (the schedule's last sync, say): a beat that stops is not
        # alive.
        try:
            super().close()
        finally:
            if self.alive_file is not None:
                self.alive_file.remove()


def send_failure(exc: BaseException) -> BaseException | None:
    """The failure of the send itself in `exc`, raised by Celery's Scheduler.apply_async; None if
    the send went through. Celery raises a send's failure as a SchedulingError while handling it
    (the failure its `__context__`); the sync of the schedule file that follows (its `finally`),
    failing, raises its own error instead, with that SchedulingError as its context if the send
    had failed, and none if it had not."""
    while exc is not None:
        if isinstance(exc, SchedulingError):
            return exc.__context__
        exc = exc.__context__
    return None
