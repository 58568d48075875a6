"""The worker step that runs a service's inbox consumer: a consumer thread that ends on its own
stops the worker (pure logic: a stand-in Kafka consumer, the worker's stop flag caught)."""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from os import EX_SOFTWARE

from shared.inbox_consumer import InboxConsumer
from tasks import consumer as consumer_step
from tests.polling import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


class _KafkaConsumer:
    """Subscribes (or fails to), polls nothing (counting its polls), closes."""

    def __init__(self, subscribe_fails: bool):
        self.subscribe_fails = subscribe_fails
        self.closed = threading.Event()
        self.polls = 0

    def subscribe(self, topics, **callbacks):
        if self.subscribe_fails:
            raise RuntimeError("no such group protocol")

    def poll(self, timeout):
        self.polls += 1
        threading.Event().wait(timeout)
        return None

    def consume(self, n, timeout):
        threading.Event().wait(timeout)
        return []

    def commit(self, offsets, asynchronous):
        pass

    def close(self):
        self.closed.set()


class _Store:
    def __call__(self, records):
        return []

    def close(self):
        pass


@pytest.fixture
def step(monkeypatch):
    """The step for one service, its consumer built on the stand-in, the worker's stop caught."""
    stops = []
    kafka = _KafkaConsumer(subscribe_fails=False)

    def build(service):
        return InboxConsumer(kafka, ["topic"], store_batch=_Store(), dispatch=lambda ids: None,
                             poll_timeout=0.01), _Store()

    monkeypatch.setattr(consumer_step, "build_inbox_consumer", build)
    monkeypatch.setattr(consumer_step, "_run_in_app_context",
                        lambda service, consumer, store: consumer.run())
    monkeypatch.setattr(consumer_step, "stop_the_worker", stops.append)
    made = consumer_step.InboxConsumerStep(SimpleNamespace(), consume=["orders"])
    return SimpleNamespace(step=made, kafka=kafka, stops=stops)


def test_a_consumer_that_ends_on_its_own_stops_the_worker(step):
    step.kafka.subscribe_fails = True
    step.step.start(SimpleNamespace())
    wait_for(lambda: step.stops, timeout=5, what="the worker told to stop")
    assert step.stops == [EX_SOFTWARE] and step.kafka.closed.is_set()


def _polling(step) -> None:
    """The consumer's loop running as it does with nothing to read, not failing and retrying."""
    wait_for(lambda: step.kafka.polls >= 3, timeout=5, what="the consumer polling")


def test_a_consumer_stopped_with_the_worker_does_not_stop_it_again(step):
    step.step.start(SimpleNamespace())
    _polling(step)
    step.step.stop(SimpleNamespace())
    assert step.kafka.closed.is_set() and not step.step.threads[0].is_alive()
    assert step.stops == []


def test_a_cold_shutdown_stops_the_consumer_without_waiting(step):
    step.step.start(SimpleNamespace())
    _polling(step)
    step.step.terminate(SimpleNamespace())
    wait_for(step.kafka.closed.is_set, timeout=5, what="the consumer closed")
    step.step.threads[0].join(5)
    assert step.stops == []


def test_stopping_the_worker_sets_the_flag_its_main_loop_checks(monkeypatch):
    from celery.exceptions import WorkerShutdown
    from celery.worker import state

    monkeypatch.setattr(state, "should_stop", None)
    consumer_step.stop_the_worker(EX_SOFTWARE).cancel()  # (its hard end would end pytest)
    with pytest.raises(WorkerShutdown) as raised:
        state.maybe_shutdown()
    assert raised.value.code == EX_SOFTWARE


def test_the_answers_to_the_consumers_offset_commits_reach_it(monkeypatch):
    """A confluent-kafka consumer takes its on_commit as it is made: the one the step builds is
    given one that hands each answer to the InboxConsumer it runs."""
    made = {}

    def build_consumer(settings, group, on_commit):
        made["on_commit"] = on_commit
        return _KafkaConsumer(subscribe_fails=False)

    monkeypatch.setattr(consumer_step, "build_consumer", build_consumer)
    monkeypatch.setattr(consumer_step, "ensure_topics", lambda settings, topics: None)
    consumer, _ = consumer_step.build_inbox_consumer("payments")
    answers = []
    monkeypatch.setattr(consumer, "note_commit_result",
                        lambda error, partitions: answers.append((error, partitions)))
    made["on_commit"]("an error", ["partitions"])
    assert answers == [("an error", ["partitions"])]


def test_a_warm_shutdown_that_does_not_end_within_its_grace_ends_the_process_hard():
    """A worker whose consumer ended asks a warm shutdown, which waits for the pool's threads: one
    hung holds it for ever (as a thread never joined does here). Within the grace the process ends
    all the same, with the code asked, saying why."""
    script = textwrap.dedent("""
        import logging, threading
        logging.basicConfig(level=logging.INFO)
        from tasks.consumer import stop_the_worker
        hung = threading.Thread(target=threading.Event().wait)  # (not a daemon: joined at exit)
        hung.start()
        stop_the_worker(70, grace_seconds=0.5)
        hung.join()
    """)
    began = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=30)
    assert ended.returncode == EX_SOFTWARE, ended.stderr
    assert time.monotonic() - began < 20
    assert ("CRITICAL:tasks.consumer:the worker's warm shutdown has not ended within 0.5 s"
            in ended.stderr)


def test_a_warm_shutdown_past_its_grace_waits_for_a_handler_task_making_progress():
    """A sound handler task may run for minutes (a batch of contended messages, each lock waited
    for): past the grace, the process ends hard only once no handler task makes progress, here
    once the task's thread stops marking it (a task hung so is the watch's to end, but only the
    consumer's step runs here)."""
    script = textwrap.dedent("""
        import logging, threading, time
        logging.basicConfig(level=logging.INFO)
        from shared.progress import mark_progress
        from tasks import hung_tasks
        from tasks.consumer import stop_the_worker
        hung_tasks.WATCH.hung_after = 1.0

        def task():
            hung_tasks.WATCH.begun("a", "hseshop.handle_inbox_batch", "payments message(s) m1",
                                   time.monotonic())
            until = time.monotonic() + 3
            while time.monotonic() < until:  # (a statement every 0.1 s, for 3 s)
                mark_progress()
                time.sleep(0.1)
            print("quiet from now on", flush=True)
            threading.Event().wait()  # (then stuck, never ending)

        threading.Thread(target=task).start()
        stop_the_worker(70, grace_seconds=0.5)
    """)
    began = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=30)
    took = time.monotonic() - began
    assert ended.returncode == EX_SOFTWARE, ended.stderr
    assert "quiet from now on" in ended.stdout
    assert 3 < took < 20
