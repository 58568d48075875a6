"""SIGTERM or a hangup ends a test run as Ctrl-C does: no further test runs, and the processes its
fixtures started are stopped (tests/signals_end_the_run.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.polling import wait_for
from tests.process_tools import gone, start_child

REPO_ROOT = Path(__file__).resolve().parents[2]

# A run of its own: a session fixture starts a server in a session of its own (as the broker's
# fixture does); the test the signal stops has a stack's ProcessGroup up, or nothing; the test
# after it must never run.
_RUN = {
    "conftest.py": """
        from tests.signals_end_the_run import pytest_configure  # noqa: F401
        """,
    "test_stopped.py": """
        import os, time
        import pytest
        from devstack.processes import ManagedProcess, ProcessGroup

        def _started(name):
            process = ManagedProcess(name, ["sleep", "300"], os.environ, name + ".log", ".")
            process.start()
            with open(name + ".pid", "w") as pid_file:
                pid_file.write(str(process.pid))
            return process

        @pytest.fixture(scope="session")
        def server():
            process = _started("server")
            yield process
            process.stop()

        def _stopped_here():
            with open("ready", "w"):
                pass
            time.sleep(60)  # (held here until the signal comes: the scenario)

        def test_with_a_stack_up(server):
            ProcessGroup().add(_started("stack"))
            _stopped_here()

        def test_with_no_stack(server):
            _stopped_here()

        def test_never_run():
            with open("second-test-ran", "w"):
                pass
        """,
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("stopped_test, started", [("test_with_a_stack_up", ["server", "stack"]),
                                                   ("test_with_no_stack", ["server"])])
def test_a_signal_ends_the_run_and_its_fixtures_stop_what_they_started(tmp_path, signum,
                                                                       stopped_test, started):
    for name, text in _RUN.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    run = start_child(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp_path,
         "-c", os.devnull, f"test_stopped.py::{stopped_test}", "test_stopped.py::test_never_run"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), timeout=30, what="the test to start")
        pids = [int((tmp_path / f"{name}.pid").read_text()) for name in started]

        run.send_signal(signum)

        output, _ = run.communicate(timeout=30)
    finally:
        run.kill()
    try:
        assert run.returncode == pytest.ExitCode.INTERRUPTED, output
        assert not (tmp_path / "second-test-ran").exists(), output
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=10,
                 what=f"the {' and the '.join(started)} process to stop")
    finally:
        for pid in pids:  # (what a failing run left)
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
