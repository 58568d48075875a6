"""The shop's own options of `celery -A tasks worker`, as a deployment mistypes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_told_to_consume_a_service_the_shop_has_not_is_refused_in_a_usage_line(
        settings):
    """`--consume shop` (orders, payments or gateway meant) is refused as the worker reads its
    options, in click's usage lines (exit 2), before it starts. Before, the worker started, its
    consumer step failed on the name, and it stopped with a CRITICAL traceback, exit 1."""
    returncode, _, said = _celery_run_to_its_end(
        ["worker", "-Q", "options-test", "-P", "threads", "-c", "1", "--without-gossip",
         "--without-mingle", "--consume", "shop"])
    assert returncode == 2, said
    assert "Traceback" not in said
    assert ("Error: Invalid value for '--consume': 'shop' is not one of 'orders', 'payments',"
            " 'gateway'.") in said.splitlines(), said


@pytest.mark.parametrize("process", [
    ["worker", "-Q", "options-test", "-P", "threads", "-c", "1", "--without-gossip",
     "--without-mingle"],
    ["beat", "-s", "{tmp_path}/celerybeat-schedule"],
    ["flower", f"--conf={REPO_ROOT / 'flowerconfig.py'}", "--address=127.0.0.1", "--port=0"],
])
def test_a_celery_process_given_a_setting_it_cannot_take_says_it_in_a_line_and_exits_1(
        settings, tmp_path, process):
    """A worker, beat or Flower says it as the operator's commands do (settings_or_exit), as
    Celery loads celeryconfig, its password hidden; before, a ValueError's traceback, which showed
    the URL's password."""
    returncode, out, said = _celery_run_to_its_end(
        [arg.format(tmp_path=tmp_path) for arg in process],
        ORDERS_DATABASE_URL="postgresql://shop:not-to-be-shown@127.0.0.1:port/orders")
    assert returncode == 1, said
    assert (out, said.splitlines()) == ("", [
        "celery: nothing started: ORDERS_DATABASE_URL='postgresql://shop:***@127.0.0.1:port/orders':"
        " expected a PostgreSQL URL, postgresql://user:password@host:port/database"])


def _celery_run_to_its_end(arguments: list[str], **env: str) -> tuple[int, str, str]:
    """`celery -A tasks <arguments>` run until it ends (killed after a minute): its exit status,
    stdout and stderr."""
    process = start_child(
        [sys.executable, "-m", "celery", "-A", "tasks", *arguments], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        out, said = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return process.returncode, out, said
