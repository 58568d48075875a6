"""Redis refusing connections (stopped; restarting): a task's publish tries again for about 0.6 s,
riding out a blip, and then fails (shared.celery_settings.PUBLISH_RETRY_POLICY: failing at once,
a worker's retry sent in a blip was dropped, its message left to the sweeper for up to 5 minutes);
beat's count of a queue gives up within milliseconds, where kombu's connecting held beat 6 s for
each entry due (tasks/beat.py); and an entry beat could not send is tried again soon, not an
interval on. And a Redis refusing writes (out of memory), reached all the same for beat's alive
file.

On a Redis of the test's own (the session's is not the test's to stop), which this process's
Celery app sends to, counts the queues of, and beat sends to."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from celery.schedules import schedule
from redis import Redis

import tasks.beat
from devstack.infra import free_port, start_embedded_redis, wait_for_redis_of_its_own
from devstack.processes import ManagedProcess
from shared.task_queues import QUEUES_UNREACHABLE, control_queue, handler_queue
from tasks.beat import BoundedScheduler
from tasks.celery_app import app as celery_app
from tasks.inbox import dispatch_inbox_messages, handle_inbox_batch, tasks_waiting
from tests.beat_tools import TryRecordingScheduler, due_alone, tick_until
from tests.celery_tools import sending_to

# What a count of a queue may take to fail, Redis refusing: a connection attempt or two, none
# waited for (tasks.inbox.tasks_waiting), in milliseconds.
REFUSED_WITHIN = 0.3
# What a publish may take to fail, Redis refusing: its tries again, 0.6 s of waits in all
# (celeryconfig's task_publish_retry_policy), and a margin.
PUBLISH_GIVES_UP_WITHIN = 1.0
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


def test_with_redis_refusing_a_count_fails_at_once_and_a_dispatch_once_its_tries_are_spent(
        own_redis):
    assert tasks_waiting(QUEUE) == 0  # (connections made, and pooled, while Redis answers)
    dispatch_inbox_messages("payments", [uuid.uuid4()])
    own_redis.stop()

    # The first count fails on the connection it had, at once; the next ones, that connection
    # closed by then, connect afresh, which kombu tried for 6 s (0.6 s here: the connection was
    # a publish's, and kombu's publish leaves its retry policy in it). A dispatch tries again
    # over 0.6 s each time, the first as the next. (A count may raise redis-py's error: beat,
    # which counts before each send, takes any failure as Redis away, as the sweeper does.)
    for _ in range(2):
        assert _seconds_to_fail(lambda: tasks_waiting(QUEUE), Exception) < REFUSED_WITHIN
        assert _seconds_to_fail(lambda: dispatch_inbox_messages(
            "payments", [uuid.uuid4()])) < PUBLISH_GIVES_UP_WITHIN


def test_a_task_sent_as_redis_restarts_is_sent_once_it_is_back(own_redis):
    """A blip (Redis restarting) is ridden out: a worker's retry whose publish failed is dropped
    by Celery (Reject), and a dispatch's batch left to the sweeper, which takes it only once
    5 minutes old while tasks wait in the queue. Redis is started again as the publish is first
    refused, and is back within its tries."""
    dispatch_inbox_messages("payments", [uuid.uuid4()])  # (a connection pooled, Redis answering)
    own_redis.stop()
    refused = []
    restarting = threading.Thread(target=own_redis.start_again)

    def start_redis_again_once_refused(exc, interval) -> None:  # (kombu's, at each refusal)
        refused.append(exc)
        if len(refused) == 1:
            restarting.start()

    try:
        handle_inbox_batch.apply_async(
            ("payments", [str(uuid.uuid4())]),
            retry_policy={"errback": start_redis_again_once_refused})
    finally:
        if refused:
            restarting.join()
    assert refused, "the publish was never refused"
    assert tasks_waiting(handler_queue("payments")) == 1  # (Redis restarted empty: the batch)


def _relay(scheduler: BoundedScheduler):
    return scheduler.Entry(name="relay-payments-outbox", task="hseshop.relay_outbox",
                           args=("payments",), schedule=schedule(timedelta(seconds=1)),
                           app=celery_app)


def test_with_redis_refusing_beat_spends_little_on_an_entry(own_redis, tmp_path):
    """Its count of the queue failing in milliseconds and its send once its tries are spent:
    kombu's connecting for the count held beat 6 s more for each entry due."""
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"),
                                 lazy=True)
    try:
        scheduler.apply_entry(_relay(scheduler), producer=scheduler.producer)  # Redis answers
        assert tasks_waiting(QUEUE) == 1
        own_redis.stop()
        for _ in range(2):
            began = time.monotonic()
            scheduler.apply_entry(_relay(scheduler), producer=scheduler.producer)
            assert time.monotonic() - began < REFUSED_WITHIN + PUBLISH_GIVES_UP_WITHIN
        assert not scheduler.broker_reached  # (its alive file ages)
    finally:
        scheduler.close()


def test_a_redis_refusing_writes_for_want_of_memory_counts_as_reached_by_beat(own_redis,
                                                                             tmp_path):
    """Redis's error reply (out of memory: `maxmemory` reached, nothing evicted) comes from a
    Redis reached, though kombu raises it as it raises a connection refused: beat's alive file is
    renewed (its count and its send each fail; Celery logs the send's failure), where it was left
    to age as though Redis were away."""
    redis = Redis.from_url(own_redis.url)
    redis.config_set("maxmemory", 1)
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"),
                                 lazy=True)
    scheduler.note_broker_reached(False)  # (as after an outage)
    try:
        scheduler.apply_entry(_relay(scheduler), producer=scheduler.producer)
        assert scheduler.broker_reached
        assert redis.dbsize() == 0  # (nothing sent)
    finally:
        scheduler.close()
        redis.close()


def test_a_pruner_beat_could_not_send_is_tried_again_soon(own_redis, tmp_path, monkeypatch):
    """Celery's tick dates an entry's run before it sends it: a prune whose send failed, Redis
    refusing for a moment, waited out its hour. It is sent again within FIRST_RUN_WITHIN (1 s
    here) of Redis's return."""
    monkeypatch.setattr(tasks.beat, "FIRST_RUN_WITHIN", timedelta(seconds=1))
    scheduler = TryRecordingScheduler(app=celery_app,
                                      schedule_filename=str(tmp_path / "schedule"))
    tried = scheduler.tried
    pruner = "prune-payments-inbox"

    try:
        scheduler.producer  # (beat connects as it starts, Redis answering)
        due_alone(scheduler, pruner)
        own_redis.stop()
        tick_until(scheduler, lambda: tried)
        assert len(tried) == 1 and not scheduler.broker_reached  # not sent
        own_redis.start_again()
        tick_until(scheduler, lambda: tasks_waiting(QUEUE))
    finally:
        scheduler.close()

    assert tasks_waiting(QUEUE) == 1  # the prune, sent
    assert len(tried) == 2 and tried[1] - tried[0] >= 0.9  # a second later, not at once
