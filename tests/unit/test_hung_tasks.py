"""The watch over a worker's handler tasks (tasks/hung_tasks.py): which task it finds hung, and
when, by the progress its thread marks (pure logic: times and marks given, no worker)."""

import os
import threading
import time
from types import SimpleNamespace

from shared.db import (CONNECTION_TIMEOUTS, IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, POOL_WAIT_SECONDS,
                       STATEMENT_TIMEOUT_SECONDS)
from shared.progress import last_progress
from tasks import hung_tasks
from tasks.alive import AliveFileStep
from tasks.hung_tasks import (HUNG_AFTER_SECONDS, PUBLISH_GIVES_UP_SECONDS, HungTaskWatch,
                              described_arguments)
from tasks.inbox import handle_inbox_batch, handle_inbox_message, sweep_inbox
from tasks.relay import relay_outbox


def _watch(marks: dict[int, float] | None = None) -> HungTaskWatch:
    """A watch bound at 10 s, reading its threads' progress from `marks` (none by default)."""
    marks = {} if marks is None else marks
    return HungTaskWatch(hung_after=10, progress_of=marks.get)


def test_a_task_is_hung_once_it_has_run_past_the_bound_and_not_before():
    watch = _watch()
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


def test_a_task_running_past_the_bound_and_making_progress_is_not_hung():
    """A batch of contended messages waits up to 2 s for each lock, minutes in all: its statements
    go on, and it is sound however long it runs."""
    marks = {}
    watch = _watch(marks)
    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1", now=100.0, thread=1)
    for now in range(101, 200, 2):  # (a statement every 2 s, for 99 s)
        marks[1] = float(now)
        assert watch.hung(now=now + 1.5) is None
    assert watch.any_progressing(now=200.0)


def test_a_task_that_stops_making_progress_is_hung_the_bound_after_its_last():
    marks = {1: 150.0, 2: 195.0}
    watch = _watch(marks)
    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1", now=100.0, thread=1)
    watch.begun("b", "hseshop.handle_inbox_message", "payments message(s) m2", now=100.0,
                thread=2)
    assert watch.hung(now=160.0) is None  # (a's last mark 10 s ago: not past it)
    assert watch.hung(now=160.5).task_id == "a"  # (b's mark at 195 is still to come)
    assert watch.quiet_since(watch.hung(now=160.5)) == 150.0
    watch.ended("a", thread=1)
    marks[2] = 155.0
    assert watch.hung(now=165.5).task_id == "b"
    assert not watch.any_progressing(now=165.5)


def test_a_mark_made_before_the_task_began_is_no_progress_of_it():
    """A thread's marks from its previous task (or another thread of the id, gone) count nothing:
    the task is quiet since it began."""
    watch = _watch({1: 500.0})
    watch.begun("a", "hseshop.handle_inbox_message", "payments message(s) m1", now=1000.0,
                thread=1)
    assert watch.hung(now=1010.5).task_id == "a"


def test_a_retry_begun_on_another_thread_outlives_the_end_of_the_try_it_replaces():
    """Celery's self.retry keeps the task's id, and the retry may begin on another thread before
    the try that sent it has ended: that end leaves the retry watched."""
    watch = _watch()
    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1", now=100.0, thread=1)
    watch.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1", now=101.0, thread=2)
    watch.ended("a", thread=1)
    hung = watch.hung(now=111.5)
    assert (hung.task_id, hung.thread) == ("a", 2)


def test_a_task_is_noted_and_ended_on_its_own_thread(monkeypatch):
    watch = _watch()
    monkeypatch.setattr(hung_tasks, "WATCH", watch)
    task = SimpleNamespace(watched_for_hangs=True, name="hseshop.handle_inbox_message")
    hung_tasks._note_begun(task_id="a", task=task, args=("payments", "m1"))
    (running,) = watch._running.values()
    assert running.thread == threading.get_ident()
    hung_tasks._note_ended(task_id="a")
    assert not watch._running


def test_a_publish_marks_its_threads_progress():
    before = time.monotonic()
    hung_tasks._publishing()
    assert last_progress(threading.get_ident()) >= before
    hung_tasks._published()
    assert last_progress(threading.get_ident()) >= before


def test_the_bound_is_past_the_longest_single_wait_of_a_sound_task():
    assert HUNG_AFTER_SECONDS > max(STATEMENT_TIMEOUT_SECONDS, IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
                                    POOL_WAIT_SECONDS + CONNECTION_TIMEOUTS["connect_timeout"],
                                    PUBLISH_GIVES_UP_SECONDS)


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
    watch = _watch()
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
