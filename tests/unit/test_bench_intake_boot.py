"""bench.intake waits for the intake servers it started to boot by their own CPU alone: a busy
PostgreSQL or Redis of the machine's (other runs' tests, the bench's own shop settling) is no
server of its booting."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bench.intake import _wait_until_booted
from devstack.processes import ManagedProcess

BUSY = "while True: pass"


@pytest.fixture
def busy_postgres(tmp_path):
    """A process named `postgres` (as the machine's server's processes are) spending CPU all the
    while."""
    named = tmp_path / "postgres"
    os.symlink(sys.executable, named)
    process = ManagedProcess("busy-postgres", [str(named), "-c", BUSY], None,
                             tmp_path / "busy.log").start()
    yield process
    process.stop()


def test_a_busy_machine_postgres_does_not_keep_the_intake_servers_from_having_booted(
        busy_postgres, tmp_path):
    idle = ManagedProcess("baseline-api", [sys.executable, "-c", "import time; time.sleep(30)"],
                          None, tmp_path / "idle.log").start()
    try:
        started = time.monotonic()
        _wait_until_booted([idle], timeout=5)
        assert time.monotonic() - started < 3
    finally:
        idle.stop()
