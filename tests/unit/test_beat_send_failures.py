"""Beat's scheduler (tasks/beat.py) has an entry whose send failed due again within
FIRST_RUN_WITHIN only when the queues were unreachable (Redis away): a send that fails otherwise
would fail again, a traceback every 10 s where Celery's date made it one an interval; and a task
sent whose schedule file then failed to sync was sent, not to be sent again. Without Redis: the
app's broker is kombu's in-memory one, and the scheduler's send and sync raise as each case says."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery import Celery
from kombu import Connection
from kombu.exceptions import EncodeError, OperationalError

from tasks.beat import FIRST_RUN_WITHIN, BoundedScheduler

BROKER = "memory://"
PRUNER = "prune-now-and-then"
EVERY = timedelta(hours=1)
# The queue the entry is sent to, the test module's own (the in-memory broker is the process's:
# another test's sends would be counted).
QUEUE = f"beat-send-failures-test-{uuid.uuid4().hex[:8]}"

# The scheduler's app sends to kombu's in-memory broker (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("in_memory_broker")


class _Scheduler(BoundedScheduler):
    """Beat's scheduler whose send (of a task not registered in the app, which Celery's
    apply_async sends by the scheduler's `send_task`) raises `send_raises`, if set, and whose sync
    of the schedule file raises `sync_raises`, if set."""

    send_raises: Exception | None = None
    sync_raises: Exception | None = None

    def send_task(self, *args, **kwargs):
        if self.send_raises is not None:
            raise self.send_raises
        return super().send_task(*args, **kwargs)

    def sync(self) -> None:
        if self.sync_raises is not None:
            raise self.sync_raises
        super().sync()


@pytest.fixture
def scheduler(tmp_path) -> Iterator[_Scheduler]:
    """A scheduler whose one entry, run hourly (a pruner's interval), is due."""
    app = Celery("beat-send-failures-test", set_as_current=False, broker=BROKER)
    app.conf.beat_schedule = {PRUNER: {"task": "test.prune", "schedule": EVERY,
                                       "options": {"queue": QUEUE}}}
    app.conf.result_expires = None  # (as the shop's: no celery.backend_cleanup entry)
    made = _Scheduler(app=app, schedule_filename=str(tmp_path / "schedule"))
    made.schedule[PRUNER].last_run_at = app.now() - EVERY - timedelta(minutes=1)
    made._heap = None  # (made again from the schedule)
    try:
        yield made
    finally:
        made.send_raises = made.sync_raises = None
        made.close()


def _due_again_in(scheduler: _Scheduler) -> float:
    """Seconds until the entry is due again, once a tick has tried it."""
    assert scheduler.tick() == 0  # (Celery's tick tried a due entry: it logs a failed send)
    is_due, next_in = scheduler.schedule[PRUNER].is_due()
    assert not is_due
    return next_in


@pytest.mark.parametrize("sync_raises", [None, OSError("the schedule file's sync failed")])
def test_an_entry_whose_send_found_redis_away_is_due_again_soon(scheduler, sync_raises):
    scheduler.send_raises = OperationalError("Error 111 connecting to 127.0.0.1:6379. Refused.")
    scheduler.sync_raises = sync_raises
    assert _due_again_in(scheduler) <= FIRST_RUN_WITHIN.total_seconds()


@pytest.mark.parametrize("send_raises, sync_raises", [
    (EncodeError("Object of type object is not JSON serializable"), None),
    (EncodeError("Object of type object is not JSON serializable"),
     OSError("the schedule file's sync failed")),
    (None, OSError("the schedule file's sync failed")),
], ids=["send-fails-for-good", "send-fails-for-good-and-sync-fails", "sent-and-sync-fails"])
def test_an_entry_otherwise_failed_or_sent_is_due_an_interval_on(scheduler, send_raises,
                                                                 sync_raises):
    scheduler.send_raises = send_raises
    scheduler.sync_raises = sync_raises
    assert _due_again_in(scheduler) > EVERY.total_seconds() - 60
    with Connection(BROKER) as connection:  # (sent, to the broker the app was made with)
        assert connection.default_channel.queue_declare(QUEUE).message_count == (
            send_raises is None)
