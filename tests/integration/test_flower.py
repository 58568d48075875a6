"""Flower, run as `make run` and compose run it, against the real Redis: its Broker page reads the
lengths of the shop's queues, under the shop's key prefix (tasks/redis_transport.py), and names
every one of them whichever workers are up (flowerconfig.py, given by its path wherever Flower
starts), though the app declares none of them: a worker started without -Q reads the default queue
alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.infra import LOCALHOST, free_port
from devstack.stack import flower_argv
from shared.config import SERVICES
from shared.task_queues import queues_of
from tasks.celery_app import app as celery_app
from tests.polling import wait_for
from tests.process_tools import start_child, stop

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = "default"  # Celery's task_default_queue: nothing reads it, so what is sent there stays
TASKS_SENT = 3
SHOP_QUEUES = {name for service in SERVICES for name in queues_of(service)}
# The most tasks Flower may keep in memory, some 5 KB each (flowerconfig.py's max_tasks).
TASKS_KEPT_AT_MOST = 10_000


def _queue_rows(page: str) -> dict[str, int]:
    """Each row of the Broker page's queue table: the queue's name and its messages."""
    rows = re.findall(r'<tr id="[^"]*">\s*<td>([^<]+)</td>\s*<td[^>]*>\s*(\d+)\s*</td>', page)
    return {name: int(messages) for name, messages in rows}


def _purge() -> None:
    with celery_app.pool.acquire(block=True) as connection:
        connection.default_channel.queue_purge(QUEUE)


def _celery(*args: str, log_path: Path) -> subprocess.Popen:
    """`celery -A tasks ...` in a process of its own, configured from this layer's environment, as
    devstack runs it."""
    with open(log_path, "w") as log_file:
        return start_child([sys.executable, "-m", "celery", "-A", "tasks", *args],
                           cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                           stderr=subprocess.STDOUT)


@contextmanager
def _worker(tmp_path: Path, node: str, *queues: str) -> Iterator[subprocess.Popen]:
    """A worker named `node` answering (of the queues given as `-Q`, if any)."""
    worker = _celery("worker", *(("-Q", ",".join(queues)) if queues else ()), "-n", node,
                     "-P", "threads", "-c", "1", "--without-gossip", "--without-mingle",
                     "-l", "WARNING", log_path=tmp_path / "worker.log")
    try:
        wait_for(lambda: celery_app.control.ping(destination=[node], timeout=0.5), timeout=60,
                 what="the worker to answer")
        yield worker
    finally:
        stop(worker)


@contextmanager
def _flower(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Flower running as devstack runs it, but started in a directory of its own (not where its
    configuration file is); yields a reader of its pages (`/broker`, say), once it answers."""
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "w") as log_file:
        flower = start_child([sys.executable, "-m", *flower_argv(port)], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             stdin=subprocess.DEVNULL, stdout=log_file,
                             stderr=subprocess.STDOUT)

    def page_or_none(path: str, method: str):
        request = urllib.request.Request(f"http://{LOCALHOST}:{port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:  # not listening yet
            assert flower.poll() is None, log_path.read_text()
            return None

    def page(path: str, method: str = "GET", status: int = 200) -> str:
        """The answer's body, once Flower answers: its status must be `status`."""
        answered, body = wait_for(lambda: page_or_none(path, method), timeout=60, interval=0.2,
                                  what="Flower to answer")
        assert answered == status, (answered, body, log_path.read_text())
        return body

    try:
        yield page
    finally:
        stop(flower)


def test_flowers_broker_page_shows_the_queues_under_the_shops_prefix(settings, tmp_path):
    _purge()
    for _ in range(TASKS_SENT):
        celery_app.send_task("hseshop.flower_test", queue=QUEUE)
    try:
        with _flower(tmp_path) as page:
            assert _queue_rows(page("/broker"))[QUEUE] == TASKS_SENT
    finally:
        _purge()


def test_flower_without_a_login_refuses_every_call_of_its_api(settings, tmp_path):
    """README ("Deploying"): Flower, which compose runs with no login, shows its pages but
    changes nothing: Flower 2.2 answers 401 to its whole API unless FLOWER_UNAUTHENTICATED_API is
    set, its pages' buttons that shut a worker down or revoke a task included."""
    task_id = uuid.uuid4().hex
    with _flower(tmp_path) as page:
        page("/broker")
        for method, path in [("GET", "/api/queues/length"), ("GET", "/api/workers"),
                             ("POST", "/api/worker/shutdown/flower-test@localhost"),
                             ("POST", "/api/worker/pool/restart/flower-test@localhost"),
                             ("POST", f"/api/task/revoke/{task_id}"),
                             ("POST", "/api/task/send-task/hseshop.flower_test")]:
            page(path, method, status=401)


def test_with_no_worker_up_the_broker_page_names_every_shop_queue(settings, tmp_path):
    with _flower(tmp_path) as page:
        assert SHOP_QUEUES <= set(_queue_rows(page("/broker")))


def test_with_a_worker_up_the_broker_page_names_the_queues_no_worker_reads_too(
        settings, tmp_path):
    """Flower itself names the queues the workers it knows consume, and the app's own (the
    default queue) only while it knows none: a service whose workers are all down, others' up, is
    shown all the same. (The worker here reads a queue of its own, not a shop's: every shop queue
    is one no worker reads.)"""
    name = f"flower-test-{uuid.uuid4().hex[:8]}"
    with _worker(tmp_path, f"{name}@localhost", name), _flower(tmp_path) as page:
        def once_the_workers_queue_is_named():
            rows = _queue_rows(page("/broker"))
            return rows if name in rows else None

        rows = wait_for(once_the_workers_queue_is_named, timeout=30, interval=0.5,
                        what="Flower to name the worker's queue")
        assert SHOP_QUEUES <= set(rows), rows


def test_a_worker_started_without_queues_reads_the_default_queue_alone(settings, tmp_path):
    """The app declares no shop queue (Flower names them itself): a worker started without -Q
    would otherwise take every service's tasks, with its own service's database URL alone, and
    `celery purge` would empty every queue."""
    node = f"flower-test-{uuid.uuid4().hex[:8]}@localhost"
    with _worker(tmp_path, node):
        replies = celery_app.control.inspect(destination=[node], timeout=5).active_queues()
        assert [queue["name"] for queue in replies[node]] == [QUEUE], replies


def test_flower_keeps_no_more_than_ten_thousand_tasks_in_memory(settings, tmp_path):
    """Flower keeps every task it hears of, up to its `max_tasks`: at Flower's default, 100,000,
    some 5 KB each, it would pass half a GB as the shop runs (beat alone sends some 3.6 tasks a
    second).
    Told of more than TASKS_KEPT_AT_MOST, it keeps no more, the newest."""
    told = TASKS_KEPT_AT_MOST + 100
    with _flower(tmp_path) as page, celery_app.events.default_dispatcher(
            hostname="flower-test@localhost") as dispatcher:
        def tell(task_id: str, name: str = "hseshop.flower_test") -> None:
            dispatcher.send("task-received", uuid=task_id, name=name, args="()", kwargs="{}",
                            retries=0, eta=None)

        def kept(search: str = "") -> tuple[int, int]:
            """The Tasks page's table: how many tasks it keeps, and how many match `search`."""
            table = json.loads(page("/tasks/datatable?draw=1&start=0&length=1"
                                    "&columns[0][data]=name&order[0][column]=0&order[0][dir]=asc"
                                    f"&search[value]={search}"))
            return table["recordsTotal"], table["recordsFiltered"]

        def heard_of_a_probe() -> bool:
            # (Flower hears only of events published once its receiver has subscribed.)
            tell(uuid.uuid4().hex, name="hseshop.flower_probe")
            return kept("flower_probe")[1] > 0

        wait_for(heard_of_a_probe, timeout=60, interval=0.5, what="Flower to hear of a task")
        task_ids = [uuid.uuid4().hex for _ in range(told)]
        for task_id in task_ids:
            tell(task_id)
        wait_for(lambda: kept(task_ids[-1])[1] == 1, timeout=60, interval=0.5,
                 what="Flower to hear of the last task")
        assert kept()[0] <= TASKS_KEPT_AT_MOST
        assert kept(task_ids[0])[1] == 0  # (the oldest is forgotten)
