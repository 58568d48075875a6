"""Beat's scheduler sends no task to a queue a few of its tasks already wait in, unread: with a
service's workers away, Redis would otherwise keep every one beat sends (tasks/beat.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.schedules import schedule

from shared.task_queues import control_queue
from tasks.beat import BACKLOG_LIMIT, BoundedScheduler
from tasks.celery_app import app as celery_app
from tasks.inbox import tasks_waiting

QUEUE = control_queue("payments")


@pytest.fixture
def control_queue_unread(settings):
    """The payments control queue (no worker takes from it here), emptied before and after."""
    def purge():
        with celery_app.pool.acquire(block=True) as connection:
            connection.default_channel.queue_purge(QUEUE)

    purge()
    yield
    purge()


def test_beat_stops_adding_to_a_control_queue_no_worker_reads(control_queue_unread, tmp_path):
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"),
                                 lazy=True)
    entry = scheduler.Entry(name="relay-payments-outbox", task="hseshop.relay_outbox",
                            args=("payments",), options={"expires": 8},
                            schedule=schedule(timedelta(seconds=2)), app=celery_app)
    for _ in range(BACKLOG_LIMIT + 5):
        scheduler.apply_entry(entry)
    assert tasks_waiting(QUEUE) == BACKLOG_LIMIT

    with celery_app.pool.acquire(block=True) as connection:  # a worker takes one
        assert connection.default_channel.basic_get(QUEUE, no_ack=True) is not None
    scheduler.apply_entry(entry)
    scheduler.apply_entry(entry)
    assert tasks_waiting(QUEUE) == BACKLOG_LIMIT  # beat sends again, up to the limit
