"""A service's worker runs the tasks beat sends to its control queue soon after they are sent,
whatever backlog of handler tasks waits beside them: a real worker, started as devstack starts the
shop's (shared/task_queues.py, celeryconfig.py's prefetch), its handler tasks the test's own, each
taking a second."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.stack import WORKER_THREADS
from shared.task_queues import control_queue, handler_queue, worker_queues
from tasks.celery_app import app as celery_app
from tasks.inbox import tasks_waiting
from tests.polling import wait_for
from tests.process_tools import start_child, stop
from tests.worker_with_probe_tasks import NOTES_IT_BEGAN, TAKES_A_WHILE

REPO_ROOT = Path(__file__).resolve().parents[2]
# Each handler task of the backlog takes this long, as a slow batch may; the backlog holds enough
# of them to keep every thread busy for a minute.
BATCH_SECONDS = 1.0
BACKLOG = 60 * WORKER_THREADS
# A control task begins once a thread is free, behind at most one task more per thread (the
# prefetch): within two batches' time. With the tasks a worker prefetched four to a thread, it
# waited behind all of them, about five.
BEGINS_WITHIN_SECONDS = 3 * BATCH_SECONDS


def test_a_control_task_begins_within_two_batches_of_a_backlog_of_handler_tasks(settings,
                                                                                 tmp_path):
    service = f"probe-{uuid.uuid4().hex[:8]}"  # (queues of the test's own)
    with _worker_of(service, tmp_path):
        for _ in range(BACKLOG):
            celery_app.send_task(TAKES_A_WHILE, args=(BATCH_SECONDS,),
                                 queue=handler_queue(service))
        wait_for(lambda: tasks_waiting(handler_queue(service)) <= BACKLOG - 2 * WORKER_THREADS,
                 timeout=30, what="the worker to take its threads' tasks and those it prefetches")
        began = tmp_path / "control-task-began"
        sent_at = time.time()
        celery_app.send_task(NOTES_IT_BEGAN, args=(str(began),), queue=control_queue(service))
        wait_for(began.exists, timeout=60, what="the control task to begin")
        waited = float(began.read_text()) - sent_at
    assert waited < BEGINS_WITHIN_SECONDS, (
        f"the control task began {waited:.2f} s after it was sent, behind the handler tasks the"
        f" worker held")


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
