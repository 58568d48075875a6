"""bench.cpu_use: a process's CPU time counts its children's once they have ended, so that a
server's total (PostgreSQL's backends come and go with connections) never goes down between two
readings."""

from __future__ import annotations

import subprocess
import sys

import psutil

from bench.cpu_use import _cpu_seconds

BUSY_CHILD = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"


def test_a_child_that_ended_keeps_its_cpu_time_in_its_parents():
    parent = psutil.Process()
    before = _cpu_seconds(parent)
    subprocess.run([sys.executable, "-c", BUSY_CHILD], check=True)
    assert _cpu_seconds(parent) - before >= 0.19  # (in 10 ms ticks)
