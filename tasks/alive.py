"""A worker's sign of life for its healthcheck: a file whose modification time the worker's event
loop renews every few seconds while the worker consumes its queues.

`celery inspect ping`, the healthcheck before, starts a whole Celery client each time (about a
CPU-second) to ask the worker over Redis. Reading a file's age costs next to nothing, and still
means what the ping meant: the renewal is a timer of the consumer's event loop (with the Redis
broker the worker runs one: its timers fire from the loop that reads the queues). A worker that
lost Redis (its consumer's steps stopped while it reconnects) removes the file at once; a loop
that is stuck leaves it to age, and the healthcheck fails once it is older than
ALIVE_WITHIN_SECONDS; a file left by a worker killed outright is removed as the next one starts.

Started with `--alive-file PATH`; without it, the step does nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from celery import bootsteps
from click import Option

log = logging.getLogger(__name__)

RENEW_EVERY_SECONDS = 5.0
# How old the file may be for the worker to count as alive (docker-compose.yml's healthchecks):
# several renewals missed, not one late.
ALIVE_WITHIN_SECONDS = 30


def alive_file_option() -> Option:
    return Option(["--alive-file"], default=None,
                  help="Renew this file's modification time every few seconds from the worker's "
                       "event loop, for a healthcheck to read its age.")


class AliveFileStep(bootsteps.StartStopStep):
    """A consumer step: renews the alive file from the consumer's timer while the consumer runs
    (after its queues are consumed), and removes it as the consumer stops."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c, alive_file=None, **kwargs):
        super().__init__(c, **kwargs)
        self.path = Path(alive_file) if alive_file else None
        self.renewal = None
        if self.path is not None:
            # One left by a worker killed outright (SIGKILL, the OOM killer: no stop) in a
            # container restarted with its /tmp would read this one as healthy while it starts.
            self.path.unlink(missing_ok=True)

    def include_if(self, c) -> bool:
        return self.path is not None

    def start(self, c) -> None:
        self.renew()
        self.renewal = c.timer.call_repeatedly(RENEW_EVERY_SECONDS, self.renew)

    def stop(self, c) -> None:
        if self.renewal is not None:
            self.renewal.cancel()
            self.renewal = None
        # Gone at once rather than left to age: a worker reconnecting to Redis is not working.
        self.path.unlink(missing_ok=True)

    shutdown = terminate = stop

    def renew(self) -> None:
        try:
            self.path.touch()  # (an existing file's times set to now)
        except OSError as exc:  # a full or read-only disk: the healthcheck will say so
            log.warning("could not renew the alive file %s: %s", self.path, exc)
