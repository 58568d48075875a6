"""Flower, run as `make run` and compose run it, against the real Redis: its Broker page reads the
lengths of the shop's queues, under the shop's key prefix (tasks/redis_transport.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from devstack.infra import LOCALHOST, free_port
from tasks.celery_app import app as celery_app
from tests.polling import wait_for

QUEUE = "default"  # Celery's task_default_queue: nothing reads it, so what is sent there stays
TASKS_SENT = 3


def _queue_rows(page: str) -> dict[str, int]:
    """Each row of the Broker page's queue table: the queue's name and its messages."""
    rows = re.findall(r'<tr id="[^"]*">\s*<td>([^<]+)</td>\s*<td[^>]*>\s*(\d+)\s*</td>', page)
    return {name: int(messages) for name, messages in rows}


def _purge() -> None:
    with celery_app.pool.acquire(block=True) as connection:
        connection.default_channel.queue_purge(QUEUE)


def test_flowers_broker_page_shows_the_queues_under_the_shops_prefix(settings, tmp_path):
    _purge()
    for _ in range(TASKS_SENT):
        celery_app.send_task("hseshop.flower_test", queue=QUEUE)
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "w") as log_file:
        # In a process of its own, configured from this layer's environment, as devstack runs it.
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}",
             f"--address={LOCALHOST}"],
            cwd=Path(__file__).parents[2], stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        def page_or_none():
            try:
                with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/broker",
                                            timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()
            except OSError:  # not listening yet
                assert flower.poll() is None, log_path.read_text()
                return None

        status, page = wait_for(page_or_none, timeout=60, interval=0.2,
                                what="Flower to answer")
        assert status == 200, log_path.read_text()
        assert _queue_rows(page) == {QUEUE: TASKS_SENT}, page
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=20)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
        _purge()
