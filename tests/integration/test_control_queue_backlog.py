"""A service's worker begins a task beat sends to its control queue behind no more handler tasks
than it holds, whatever backlog waits beside them: a real worker, started as devstack starts the
shop's (shared/task_queues.py, celeryconfig.py's prefetch), its handler tasks the test's own, each
holding its thread until the test releases it (tests/worker_with_probe_tasks.py).

Counted, not timed: every task notes in a Redis list that it began, so the list gives the order
they began in, however busy the machine. A worker of the threads pool takes WORKER_THREADS *
worker_prefetch_multiplier tasks ahead of its threads (kombu's prefetch count bounds the tasks taken
and not acknowledged; a task is acknowledged as a thread begins it), and those wait in one line,
its thread pool's queue, in the order taken. With every thread held and that line full, the worker
asks Redis for nothing; the control task sent then is taken as the next handler task begins (a
release freeing a thread), first of all (kombu asks for the worker's queues in turn, the one it last
took from behind), and joins the end of the line. So as many handler tasks not begun as it is sent
begin before it as the worker takes ahead of its threads, however fast they are released: 16 (one
per thread, WORKER_THREADS 16) with the multiplier at 1, 64 at 4, as measured, every run. The test
allows 2 * WORKER_THREADS, 32: twice one per thread, half of four."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

import celeryconfig
from devstack.stack import WORKER_THREADS
from shared.task_queues import control_queue, handler_queue, worker_queues
from tasks.celery_app import app as celery_app
from tasks.inbox import tasks_waiting
from tests.polling import wait_for
from tests.process_tools import start_child, stop
from tests.worker_with_probe_tasks import NOTES_IT_BEGAN, WAITS_TO_BE_RELEASED

REPO_ROOT = Path(__file__).resolve().parents[2]
# Enough handler tasks to hold every thread and fill the line of those taken ahead at four to a
# thread, with more left in the queue.
BACKLOG = 8 * WORKER_THREADS
# At most this many handler tasks not yet begun as the control task is sent begin before it.
BEGUN_AHEAD_AT_MOST = 2 * WORKER_THREADS
CONTROL_TASK = "control"


@dataclass(frozen=True)
class _Probe:
    """The test's Redis lists: the one its tasks note they began in, and the one each handler task
    waits on for its release."""
    client: redis.Redis
    began_key: str
    released_key: str

    def began(self) -> list[str]:
        return [note.decode() for note in self.client.lrange(self.began_key, 0, -1)]

    def release(self, tasks: int = 1) -> None:
        self.client.rpush(self.released_key, *["released"] * tasks)


def test_a_control_task_begins_behind_no_more_handler_tasks_than_one_per_thread(settings,
                                                                                  tmp_path):
    service = f"probe-{uuid.uuid4().hex[:8]}"  # (queues of the test's own)
    with _probe_of(service, settings) as probe, _worker_of(service, tmp_path):
        try:
            began_when_sent = _control_task_sent_behind_a_full_worker(service, probe)
            began = _released_one_by_one_until_the_control_task_began(probe)
        finally:
            probe.release(BACKLOG)  # (every handler task still waiting, for the worker to stop)
    begun_ahead = began.index(CONTROL_TASK) - len(began_when_sent)
    assert begun_ahead <= BEGUN_AHEAD_AT_MOST, (
        f"{begun_ahead} handler tasks waiting as the control task was sent began before it, behind"
        f" the tasks the worker held; began in order: {began}")


def _control_task_sent_behind_a_full_worker(service: str, probe: _Probe) -> list[str]:
    """Send the backlog, wait until the worker holds a task on every thread and has taken all it
    takes ahead of them, as many as celeryconfig.py says (sent sooner, the control task would find
    fewer ahead of it than the worker takes), send the control task; what had begun as it was
    sent."""
    for number in range(BACKLOG):
        celery_app.send_task(WAITS_TO_BE_RELEASED,
                             args=(probe.began_key, str(number), probe.released_key),
                             queue=handler_queue(service))
    taken_ahead = WORKER_THREADS * celeryconfig.worker_prefetch_multiplier
    began = wait_for(lambda: _when_as_many_began(probe, WORKER_THREADS), timeout=30,
                     what="every thread of the worker to begin a handler task")
    wait_for(lambda: tasks_waiting(handler_queue(service))
             <= BACKLOG - WORKER_THREADS - taken_ahead,
             timeout=30, what=f"the worker to take {taken_ahead} handler tasks ahead")
    celery_app.send_task(NOTES_IT_BEGAN, args=(probe.began_key, CONTROL_TASK),
                         queue=control_queue(service))
    return began


def _released_one_by_one_until_the_control_task_began(probe: _Probe) -> list[str]:
    """Release the handler tasks one at a time, each once the one before has let the next task
    begin, until the control task has begun; the tasks in the order they began."""
    began = probe.began()
    while CONTROL_TASK not in began:
        probe.release()
        began = wait_for(lambda at_least=len(began) + 1: _when_as_many_began(probe, at_least),
                         timeout=30, what="the next task to begin on the thread released")
    return began


def _when_as_many_began(probe: _Probe, tasks: int) -> list[str] | None:
    """The tasks begun, once at least `tasks` have."""
    began = probe.began()
    return began if len(began) >= tasks else None


@contextmanager
def _probe_of(service: str, settings) -> Iterator[_Probe]:
    """The test's lists, under the run's Redis key prefix; deleted at the end."""
    with closing(redis.Redis.from_url(settings.redis_url)) as client:
        probe = _Probe(client, f"{settings.redis_key_prefix}:{service}:began",
                       f"{settings.redis_key_prefix}:{service}:released")
        try:
            yield probe
        finally:
            client.delete(probe.began_key, probe.released_key)


@contextmanager
def _worker_of(service: str, tmp_path: Path) -> Iterator[None]:
    """A worker of the service's queues, as devstack starts one (but for the Kafka consumer), with
    the test's tasks; its queues deleted once it has stopped."""
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        worker = start_child(
            [sys.executable, "-m", "tests.worker_with_probe_tasks", "-A", "tasks", "worker",
             "-Q", worker_queues(service), "-n", f"{service}@localhost", "-P", "threads",
             "-c", str(WORKER_THREADS), "--without-gossip", "--without-mingle", "-l", "INFO"],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " ready." in log_path.read_text(), timeout=60,
                 what="the worker to start")
        yield
    finally:
        stop(worker, timeout=30)
        with celery_app.pool.acquire(block=True) as connection:
            for queue in (control_queue(service), handler_queue(service)):
                connection.default_channel.queue_delete(queue)
