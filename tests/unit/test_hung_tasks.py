"""The watch over a worker's handler tasks (tasks/hung_tasks.py): which task it finds hung, and
when (pure logic: times given, no worker)."""

import os
import time
from types import SimpleNamespace

from shared.db import IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, STATEMENT_TIMEOUT_SECONDS
from tasks import hung_tasks
from tasks.alive import AliveFileStep
from tasks.hung_tasks import HUNG_AFTER_SECONDS, HungTaskWatch, described_arguments
from tasks.inbox import handle_inbox_batch, handle_inbox_message, sweep_inbox
from tasks.relay import relay_outbox


def test_a_task_is_hung_once_it_has_run_past_the_bound_and_not_before():
    watch = HungTaskWatch(hung_after=10)
    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1, m2", now=100.0)
    watch.begun("b", "hseshop.handle_inbox_message", "payments message(s) m3", now=105.0)
    assert watch.hung(now=110.0) is None  # (10 s: not past it)
    hung = watch.hung(now=110.5)
    assert (hung.task_id, hung.name, hung.described) == (
        "a", "hseshop.handle_inbox_batch", "payments message(s) m1, m2")
    watch.ended("a")
    assert watch.hung(now=114.0) is None
    assert watch.hung(now=115.5).task_id == "b"
    watch.ended("b")
    watch.ended("b")  # (ended twice: nothing to end)
    assert watch.hung(now=1000.0) is None


def test_the_bound_is_past_what_the_database_may_hold_a_sound_task_up_for():
    assert HUNG_AFTER_SECONDS > STATEMENT_TIMEOUT_SECONDS + IDLE_IN_TRANSACTION_TIMEOUT_SECONDS


def test_the_handler_tasks_are_watched_and_the_relay_and_the_sweeper_are_not():
    assert handle_inbox_batch.watched_for_hangs and handle_inbox_message.watched_for_hangs
    assert not getattr(relay_outbox, "watched_for_hangs", False)  # (it leads for good)
    assert not getattr(sweep_inbox, "watched_for_hangs", False)


def test_a_handler_tasks_arguments_are_said_with_its_service_and_messages():
    assert described_arguments(("orders", ["m1", "m2"])) == "orders message(s) m1, m2"
    assert described_arguments(("orders", "m1")) == "orders message(s) m1"


def test_the_alive_file_is_not_renewed_while_a_task_is_hung(monkeypatch, tmp_path):
    """The consumer's timer renews the file whatever the pool's threads do: not while a handler
    task has run past the bound, so that the healthcheck agrees with the watch."""
    watch = HungTaskWatch(hung_after=10)
    monkeypatch.setattr(hung_tasks, "WATCH", watch)
    step = AliveFileStep(SimpleNamespace(), alive_file=tmp_path / "alive")
    step.file.renew()

    def renewed() -> bool:
        os.utime(step.file.path, (0, 0))
        step._renew_unless_hung()
        return step.file.path.stat().st_mtime > 0

    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1",
                now=time.monotonic() - 5)
    assert renewed()  # (running, not past the bound)
    watch.begun("b", "hseshop.handle_inbox_message", "payments message(s) m2",
                now=time.monotonic() - 11)
    assert not renewed()
    watch.ended("b")
    assert renewed()
