"""Beat's scheduler sends no task to a queue a few of its tasks already wait in, unread: with a
service's workers away, Redis would otherwise keep every one beat sends; it follows the wall clock
back and runs an entry it has no record of soon, not an interval on (tasks/beat.py); and what it
sends is run by a worker whose clock is ahead of beat's (celeryconfig.py)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
from celery.beat import ScheduleEntry
from celery.schedules import schedule
from celery.worker.request import Request

import celeryconfig
import tasks.beat
from shared.task_queues import control_queue
from tasks.beat import BACKLOG_LIMIT, FIRST_RUN_WITHIN, BoundedScheduler
from tasks.celery_app import app as celery_app
from tasks.inbox import tasks_waiting
from tests.beat_tools import TryRecordingScheduler, due_alone, tick_until

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
                            args=("payments",),
                            schedule=schedule(timedelta(seconds=2)), app=celery_app)
    for _ in range(BACKLOG_LIMIT + 5):
        scheduler.apply_entry(entry)
    assert tasks_waiting(QUEUE) == BACKLOG_LIMIT

    with celery_app.pool.acquire(block=True) as connection:  # a worker takes one
        assert connection.default_channel.basic_get(QUEUE, no_ack=True) is not None
    scheduler.apply_entry(entry)
    scheduler.apply_entry(entry)
    assert tasks_waiting(QUEUE) == BACKLOG_LIMIT  # beat sends again, up to the limit


def test_beat_goes_on_after_the_wall_clock_went_back(tmp_path):
    sent = []

    class RecordingScheduler(BoundedScheduler):
        def apply_entry(self, entry, producer=None):
            sent.append(entry.name)

    scheduler = RecordingScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"))
    # Every entry last ran an hour from now: the clock went back an hour since.
    an_hour_on = celery_app.now() + timedelta(hours=1)
    for entry in scheduler.schedule.values():
        entry.last_run_at = an_hour_on - timedelta(seconds=1)
    scheduler.schedule["prune-gateway-notifications"].last_run_at = an_hour_on - timedelta(
        minutes=40)  # (20 minutes of its hour still to wait)

    try:
        deadline = time.monotonic() + 10
        while "relay-orders-outbox" not in sent and time.monotonic() < deadline:
            time.sleep(min(max(scheduler.tick(), 0), 0.05))  # (as beat: none below 0)
        pruning_due_in = scheduler.schedule["prune-gateway-notifications"].is_due().next
    finally:
        scheduler.close()

    assert "relay-orders-outbox" in sent
    assert "prune-gateway-notifications" not in sent
    assert pruning_due_in == pytest.approx(20 * 60, abs=30)  # its spacing kept


def _warnings_of_a_beat_starting(schedule_file: Path, caplog) -> list[str]:
    """What tasks.beat warns of as a scheduler starts (and closes) with the app's schedule."""
    with caplog.at_level(logging.WARNING, logger=tasks.beat.__name__):
        BoundedScheduler(app=celery_app, schedule_filename=str(schedule_file)).close()
    return [record.getMessage() for record in caplog.records
            if record.name == tasks.beat.__name__]


def test_beat_warns_as_it_starts_of_a_relay_lead_checked_less_often_than_once_a_second(
        tmp_path, monkeypatch, caplog):
    """Issue 2: beat runs the relay at least once a second, the safety net that replaces a dead
    leader. A longer OUTBOX_RELAY_INTERVAL_SECONDS (2 was the default before) is taken, and said."""
    assert _warnings_of_a_beat_starting(tmp_path / "default", caplog) == []
    caplog.clear()

    monkeypatch.setitem(celery_app.conf.beat_schedule, "relay-payments-outbox", {
        "task": "hseshop.relay_outbox", "schedule": timedelta(seconds=2), "args": ("payments",)})
    assert _warnings_of_a_beat_starting(tmp_path / "slow", caplog) == [
        "OUTBOX_RELAY_INTERVAL_SECONDS=2: beat checks that a relay leads each outbox only every"
        " 2 s, so a relay leader that dies goes unreplaced that long; the relay's safety net is to"
        " run at least every 1 s (the default)"]


def _due_in(scheduler: BoundedScheduler) -> dict[str, float]:
    """Each entry's seconds until it is due (0 if it is), as beat's tick reads them."""
    states = {name: entry.is_due() for name, entry in scheduler.schedule.items()}
    return {name: 0 if is_due else next_in for name, (is_due, next_in) in states.items()}


def test_a_beat_with_a_new_schedule_file_runs_each_pruner_soon(tmp_path, monkeypatch):
    """A fresh volume (a first deploy, `docker compose down -v`): Celery would start each entry an
    interval from now, the pruners an hour on, and a beat recreated more often never ran them. One
    every 2 s (a short interval, as the relay's lead and the sweeper have) starts an interval on,
    as before."""
    monkeypatch.setitem(celery_app.conf.beat_schedule, "every-2-s", {
        "task": "hseshop.relay_outbox", "schedule": timedelta(seconds=2), "args": ("payments",)})
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"))
    try:
        due_in = _due_in(scheduler)
        intervals = {name: entry.schedule.run_every.total_seconds()
                     for name, entry in scheduler.schedule.items()}
    finally:
        scheduler.close()

    assert set(due_in) == set(celery_app.conf.beat_schedule) >= set(celeryconfig.beat_schedule)
    assert intervals["prune-gateway-notifications"] == 3600
    assert due_in["prune-gateway-notifications"] <= FIRST_RUN_WITHIN.total_seconds()
    for name, interval in intervals.items():  # each within FIRST_RUN_WITHIN, or its interval
        assert due_in[name] == pytest.approx(
            min(interval, FIRST_RUN_WITHIN.total_seconds()), abs=1), name
    assert due_in["every-2-s"] == pytest.approx(2, abs=1)


def test_a_beat_restarted_with_its_schedule_file_keeps_each_entrys_last_run(tmp_path):
    """Restarted, beat runs each pruner an interval from its last run, not again at once; an entry
    the file has no record of (new in this release) runs soon."""
    schedule_file = str(tmp_path / "schedule")
    before = BoundedScheduler(app=celery_app, schedule_filename=schedule_file)
    a_minute_ago = celery_app.now() - timedelta(minutes=1)
    try:
        for entry in before.schedule.values():  # every entry ran a minute ago...
            entry.last_run_at = a_minute_ago
        del before.schedule["prune-gateway-notifications"]  # ...and this one is new
    finally:
        before.close()

    scheduler = BoundedScheduler(app=celery_app, schedule_filename=schedule_file)
    try:
        due_in = _due_in(scheduler)
        last_runs = {name: entry.last_run_at for name, entry in scheduler.schedule.items()}
    finally:
        scheduler.close()

    assert due_in.pop("prune-gateway-notifications") <= FIRST_RUN_WITHIN.total_seconds()
    del last_runs["prune-gateway-notifications"]
    assert last_runs == {name: a_minute_ago for name in last_runs}
    assert due_in["prune-gateway-signed-out-tokens"] == pytest.approx(59 * 60, abs=5)
    assert due_in["prune-orders-inbox"] == pytest.approx(
        celeryconfig.beat_schedule["prune-orders-inbox"]["schedule"].total_seconds() - 60, abs=5)


def test_a_pruner_not_sent_for_the_backlog_is_tried_again_soon(control_queue_unread, tmp_path,
                                                                monkeypatch):
    """Celery's tick dates an entry's run before it sends it: a prune not sent for the backlog
    waited out its hour. It is tried again within FIRST_RUN_WITHIN (1 s here), not at once."""
    monkeypatch.setattr(tasks.beat, "FIRST_RUN_WITHIN", timedelta(seconds=1))
    scheduler = TryRecordingScheduler(app=celery_app,
                                      schedule_filename=str(tmp_path / "schedule"))
    tried = scheduler.tried
    pruner = "prune-payments-inbox"
    relay = scheduler.Entry(name="relay", task="hseshop.relay_outbox", args=("payments",),
                            schedule=schedule(timedelta(seconds=2)), app=celery_app)
    try:
        for _ in range(BACKLOG_LIMIT):
            BoundedScheduler.apply_entry(scheduler, relay)
        due_alone(scheduler, pruner)
        tick_until(scheduler, lambda: tried)
        assert len(tried) == 1 and tasks_waiting(QUEUE) == BACKLOG_LIMIT  # not sent
        with celery_app.pool.acquire(block=True) as connection:  # a worker takes them all
            connection.default_channel.queue_purge(QUEUE)
        tick_until(scheduler, lambda: tasks_waiting(QUEUE))
        last_run = scheduler.schedule[pruner].last_run_at
    finally:
        scheduler.close()

    assert tasks_waiting(QUEUE) == 1  # the prune, sent
    assert len(tried) == 2 and tried[1] - tried[0] >= 0.9  # a second later, not at once
    assert last_run == pytest.approx(celery_app.now(), abs=timedelta(seconds=5))


def test_a_worker_whose_clock_is_ahead_of_beats_runs_every_task_beat_sends(
        control_queue_unread, tmp_path, monkeypatch):
    """Celery stamps a task's `expires` as a moment on the sender's clock, and the worker that
    takes it compares that with its own (Request.maybe_expire): with beat's host a few seconds
    behind the workers', a relay task that expired 8 s on arrived expired, was dropped unrun, and
    a leader lost was never replaced. Beat's clock here is an hour behind this worker's."""
    beats_clock = celery_app.now
    monkeypatch.setattr(celery_app, "now", lambda: beats_clock() - timedelta(hours=1))
    scheduler = BoundedScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"),
                                 lazy=True)
    sent = {name: entry["task"] for name, entry in celeryconfig.beat_schedule.items()
            if entry["args"] == ("payments",)}
    assert "hseshop.relay_outbox" in sent.values()
    for name, entry in celeryconfig.beat_schedule.items():
        if name in sent:
            scheduler.apply_entry(ScheduleEntry(name=name, app=celery_app, **entry))

    taken = {}
    with celery_app.pool.acquire(block=True) as connection:  # as a worker takes them
        while (message := connection.default_channel.basic_get(QUEUE, no_ack=True)) is not None:
            request = Request(message, app=celery_app)
            taken[request.name] = request.maybe_expire()
    assert taken == {task: None for task in sent.values()}  # none expired
