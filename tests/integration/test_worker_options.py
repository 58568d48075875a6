"""The shop's own options of `celery -A tasks worker`, as a deployment mistypes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_told_to_consume_a_service_the_shop_has_not_is_refused_in_a_usage_line(
        settings):
    """`--consume shop` (orders, payments or gateway meant) is refused as the worker reads its
    options, in click's usage lines (exit 2), before it starts. Before, the worker started, its
    consumer step failed on the name, and it stopped with a CRITICAL traceback, exit 1."""
    worker = start_child(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "options-test",
         "-P", "threads", "-c", "1", "--without-gossip", "--without-mingle", "--consume",
         "shop"], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, said = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert worker.returncode == 2, said
    assert "Traceback" not in said
    assert ("Error: Invalid value for '--consume': 'shop' is not one of 'orders', 'payments',"
            " 'gateway'.") in said.splitlines(), said
