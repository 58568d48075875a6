"""Beat's scheduler driven tick by tick in a test, one entry due alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from tasks.beat import BoundedScheduler


class TryRecordingScheduler(BoundedScheduler):
    """Beat's scheduler, noting when it tries to send an entry (`tried`: time.monotonic())."""

    def __init__(self, *args, **kwargs):
        self.tried: list[float] = []
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry, producer=None):
        self.tried.append(time.monotonic())
        super().apply_entry(entry, producer=producer)


def due_alone(scheduler: BoundedScheduler, name: str) -> None:
    """Leave the entry `name` alone in the schedule, a minute past due, as after a restart (the
    heap made again from the schedule)."""
    for other in set(scheduler.schedule) - {name}:
        del scheduler.schedule[other]
    interval = scheduler.schedule[name].schedule.run_every
    scheduler.schedule[name].last_run_at = scheduler.app.now() - interval - timedelta(minutes=1)
    scheduler._heap = None


def tick_until(scheduler: BoundedScheduler, done: Callable[[], object],
               timeout: float = 5) -> None:
    """Tick as beat does (sleeping what each tick says, none below 0) until `done()` or
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(min(max(scheduler.tick(), 0), 0.05))
