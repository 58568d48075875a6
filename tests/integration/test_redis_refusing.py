"""Redis refusing connections (stopped; restarting): what talks to Celery's queues gives up within
REFUSED_WITHIN, where kombu's retries held beat 6.6 s for each entry due (its count of the queue,
tasks/beat.py, 6 s; its send 0.6 s) and the inbox consumer 0.6 s for each batch it stored; and an
entry beat could not send is tried again soon, not an interval on.

On a Redis of the test's own (the session's is not the test's to stop), which this process's
Celery app sends to, counts the queues of, and beat sends to."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from celery.schedules import schedule

import tasks.beat
from devstack.infra import free_port, start_embedded_redis, wait_for_redis_of_its_own
from devstack.processes import ManagedProcess
from shared.task_queues import QUEUES_UNREACHABLE, control_queue
from tasks.beat import BoundedScheduler
from tasks.celery_app import app as celery_app
from tasks.inbox import dispatch_inbox_messages, tasks_waiting
from tests.celery_tools import sending_to

# What a call to the queues may take to fail, Redis refusing: a few connection attempts, none
# waited for (celeryconfig's task_publish_retry_policy; tasks.inbox.tasks_waiting), in milliseconds.
REFUSED_WITHIN = 0.3
QUEUE = control_queue("payments")


@dataclass
class OwnRedis:
    url: str
    server: ManagedProcess

    def stop(self) -> None:
        self.server.stop()

    def start_again(self) -> None:
        """On its port, as a Redis restarted is (empty)."""
        self.server.start()
        wait_for_redis_of_its_own(self.server, self.url, 15)


@pytest.fixture
def own_redis(settings, tmp_path, note_started) -> Iterator[OwnRedis]:
    """A Redis of the test's own, which this process's Celery app sends tasks to while the test
    runs."""
    url, server = start_embedded_redis(tmp_path, free_port(), on_start=note_started)
    try:
        with sending_to(celery_app, f"{url}/0"):
            yield OwnRedis(url, server)
    finally:
        server.stop()


def _seconds_to_fail(call, raising=QUEUES_UNREACHABLE) -> float:
    began = time.monotonic()
    with pytest.raises(raising):
        call()
    return time.monotonic() - began


def test_with_redis_refusing_counting_a_queue_and_dispatching_fail_at_once(own_redis):
    assert tasks_waiting(QUEUE) == 0  # (connections made, and pooled, while Redis answers)
    dispatch_inbox_messages("payments", [uuid.uuid4()])
    own_redis.stop()

    # The first count fails on the connection it had, at once; the next ones, that connection
    # closed by then, connect afresh, which kombu tried for 6 s. The first dispatch reconnects as
    # well (0.6 s, Celery's retries, each time). (A count may raise redis-py's error: beat, which
    # counts before each send, takes any failure as Redis away, as the sweeper does.)
    for _ in range(2):
        assert _seconds_to_fail(lambda: tasks_waiting(QUEUE), Exception) < REFUSED_WITHIN
        assert _seconds_to_fail(
            lambda: dispatch_inbox_messages("payments", [uuid.uuid4()])) < REFUSED_WITHIN


def _relay(scheduler: BoundedScheduler):
    return scheduler.Entry(name="relay-payments-outbox", task="hseshop.relay_outbox",
                           args=("payments",), schedule=schedule(timedelta(seconds=1)),
                           app=celery_app)


def test_with_redis_refusing_beat_spends_little_on_an_entry(own_redis, tmp_path):
    """Its count of the queue and its send, each failing in milliseconds; beat is no longer
    behind by 6.6 s for each entry due during the outage once Redis is back."""
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"),
                                 lazy=True)
    try:
        scheduler.apply_entry(_relay(scheduler), producer=scheduler.producer)  # Redis answers
        assert tasks_waiting(QUEUE) == 1
        own_redis.stop()
        for _ in range(2):
            began = time.monotonic()
            scheduler.apply_entry(_relay(scheduler), producer=scheduler.producer)
            assert time.monotonic() - began < 2 * REFUSED_WITHIN
        assert not scheduler.broker_reached  # (its alive file ages)
    finally:
        scheduler.close()


def test_a_pruner_beat_could_not_send_is_tried_again_soon(own_redis, tmp_path, monkeypatch):
    """Celery's tick dates an entry's run before it sends it: a prune whose send failed, Redis
    refusing for a moment, waited out its hour. It is sent again within FIRST_RUN_WITHIN (1 s
    here) of Redis's return."""
    monkeypatch.setattr(tasks.beat, "FIRST_RUN_WITHIN", timedelta(seconds=1))
    tried = []

    class TryRecordingScheduler(BoundedScheduler):
        def apply_entry(self, entry, producer=None):
            tried.append(time.monotonic())
            super().apply_entry(entry, producer=producer)

    scheduler = TryRecordingScheduler(app=celery_app,
                                      schedule_filename=str(tmp_path / "schedule"))
    pruner = "prune-payments-inbox"

    def tick_until(done) -> None:
        deadline = time.monotonic() + 5
        while not done() and time.monotonic() < deadline:
            time.sleep(min(max(scheduler.tick(), 0), 0.05))  # (as beat: none below 0)

    try:
        scheduler.producer  # (beat connects as it starts, Redis answering)
        for name in set(scheduler.schedule) - {pruner}:
            del scheduler.schedule[name]
        interval = scheduler.schedule[pruner].schedule.run_every
        scheduler.schedule[pruner].last_run_at = celery_app.now() - interval - timedelta(minutes=1)
        scheduler._heap = None  # (as after a restart: the heap is made from the schedule)
        own_redis.stop()
        tick_until(lambda: tried)
        assert len(tried) == 1 and not scheduler.broker_reached  # not sent
        own_redis.start_again()
        tick_until(lambda: tasks_waiting(QUEUE))
    finally:
        scheduler.close()

    assert tasks_waiting(QUEUE) == 1  # the prune, sent
    assert len(tried) == 2 and tried[1] - tried[0] >= 0.9  # a second later, not at once
