"""Beat's scheduler and its alive file (tasks/alive.py), without Redis: a beat that stops removes
the file, even when closing its schedule fails; only a send that could not connect counts as the
broker not reached."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from celery import Celery
from celery.beat import Scheduler, SchedulingError
from celery.schedules import schedule
from kombu.exceptions import EncodeError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis import exceptions as redis_errors

from shared.task_queues import redis_reached
from tasks.alive import BEAT_ALIVE_FILE_SETTING, AliveFileScheduler


# The test schedulers' apps send to kombu's in-memory broker (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("in_memory_broker")


class _ClosingFails(Scheduler):
    def close(self) -> None:
        raise OSError("the schedule's last sync failed")


class _Scheduler(AliveFileScheduler, _ClosingFails):
    pass


def test_a_beat_whose_closing_fails_removes_its_alive_file_all_the_same(tmp_path):
    path = tmp_path / "alive"
    app = Celery("alive-close-test", set_as_current=False)
    app.conf[BEAT_ALIVE_FILE_SETTING] = str(path)
    scheduler = _Scheduler(app=app, lazy=True)
    scheduler.alive_file.renew()
    with pytest.raises(OSError):
        scheduler.close()
    assert not path.exists()


# What a failed send says of the broker: beat's alive file ages only while its sends cannot
# connect (tasks/alive.py). On kombu's in-memory transport, which takes any send.

class _AliveFileScheduler(AliveFileScheduler, Scheduler):
    pass


class _FirstSyncFails(_AliveFileScheduler):
    """Its schedule file synced after every send, the first sync failing (a disk full)."""

    synced = 0

    def should_sync(self) -> bool:
        return True

    def sync(self) -> None:
        self.synced += 1
        if self.synced == 1:
            raise OSError(28, "No space left on device")


def _scheduler(scheduler_class, tmp_path):
    app = Celery("alive-send-test", broker="memory://", set_as_current=False)
    app.conf[BEAT_ALIVE_FILE_SETTING] = str(tmp_path / "alive")
    return scheduler_class(app=app, lazy=True)


# The queue the test entries are sent to, the test module's own (the in-memory broker is the
# process's: another test's sends to `celery` would be counted).
QUEUE = f"alive-send-test-{uuid.uuid4().hex[:8]}"


def _entry(scheduler, *args):
    return scheduler.Entry(name="alive-send-test", task="hseshop.alive_send_test", args=args,
                           schedule=schedule(timedelta(seconds=1)), options={"queue": QUEUE},
                           app=scheduler.app)


def test_a_send_that_cannot_be_serialized_says_nothing_of_the_broker(tmp_path):
    """It failed before it got to Redis (its arguments not JSON): no sign of Redis being away,
    so the alive file is not left to age for it."""
    scheduler = _scheduler(_AliveFileScheduler, tmp_path)
    try:
        with pytest.raises(SchedulingError) as raised:
            scheduler.apply_async(_entry(scheduler, object()), producer=scheduler.producer)
        assert isinstance(raised.value.__context__, EncodeError)
        assert scheduler.broker_reached
    finally:
        scheduler.close()


def test_a_send_that_went_through_counts_though_the_schedule_files_sync_after_it_failed(
        tmp_path):
    scheduler = _scheduler(_FirstSyncFails, tmp_path)
    scheduler.note_broker_reached(False)  # (an outage before)
    try:
        with pytest.raises(OSError, match="No space left"):
            scheduler.apply_async(_entry(scheduler, "sent"), producer=scheduler.producer)
        assert scheduler.broker_reached
        with scheduler.app.connection_for_write() as connection:
            assert connection.default_channel.queue_declare(
                QUEUE, passive=True).message_count == 1  # (sent)
    finally:
        scheduler.close()


@pytest.mark.parametrize("failure, reached", [
    (redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
     False),
    (redis_errors.TimeoutError("Timeout reading from socket"), False),
    (ConnectionResetError(104, "Connection reset by peer"), False),
    (redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
    (redis_errors.ReadOnlyError("You can't write against a read only replica."), True),
    (EncodeError(TypeError("Object of type object is not JSON serializable")), None),
    (TypeError("a bug"), None),
])
def test_what_a_failed_call_says_of_redis_as_raised_and_as_kombus_error(failure, reached):
    assert redis_reached(failure) is reached
    if reached is not None:  # kombu's OperationalError made of it, as a publish raises it
        try:
            raise KombuOperationalError(str(failure)) from failure
        except KombuOperationalError as wrapped:
            assert redis_reached(wrapped) is reached
