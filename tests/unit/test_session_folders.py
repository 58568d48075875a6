"""What a test session killed outright left running is stopped by the next session, and a session
still running is never reaped (tests/session_folders.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from devstack.leftovers import started_at
from devstack.processes import ManagedProcess
from tests.polling import wait_for
from tests.process_tools import gone
from tests.session_folders import begin_session, reap_sessions_gone

REPO_ROOT = Path(__file__).resolve().parents[2]

# A test session, as far as its servers go: it begins its record under the root it is given,
# starts a server noted in it and a stack's process noted in the stack's own record in its run
# folder, prints their pids, then "ready", and waits.
SESSION = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from devstack.leftovers import RunRecord
    from devstack.processes import ManagedProcess
    from tests.session_folders import begin_session
    record = begin_session(Path(sys.argv[1]))
    stack_record = RunRecord(record.path.parent / "run" / "e2e" / "processes")
    stack_record.begin()
    for name, told in (("redis", record), ("gateway", stack_record)):
        process = ManagedProcess(name, ["sleep", "300"], os.environ,
                                 record.path.parent / f"{name}.log")
        process.on_start = lambda p, told=told: told.note(p.pid, p.stop_signal, p.name)
        print(process.start().pid, flush=True)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def _session(root: Path) -> tuple[subprocess.Popen, list[int]]:
    session = subprocess.Popen([sys.executable, "-c", SESSION, str(root)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    pids = [int(session.stdout.readline()) for _ in range(2)]
    assert session.stdout.readline().strip() == "ready"
    return session, pids


def test_what_a_session_killed_outright_left_running_the_next_session_stops(tmp_path):
    root = tmp_path / "sessions"
    killed, pids = _session(root)
    running, running_pids = _session(root)  # (another session, at once: left alone)
    try:
        killed.kill()  # (SIGKILL: no chance to stop anything)
        killed.wait(10)
        assert not any(gone(pid) for pid in pids)  # left running

        record = begin_session(root)
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=5, what="what was left to end")
        assert not [name for name in os.listdir(root)  # (its folder removed)
                    if name.startswith(f"session-{killed.pid}-")]
        assert not any(gone(pid) for pid in running_pids)
        record.end()
    finally:  # (what the test leaves, if it fails)
        for session in (killed, running):
            session.kill()
            session.wait(10)
        for pid in pids + running_pids:
            if not gone(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_session_is_known_by_its_pid_and_the_moment_it_started(tmp_path):
    """A session's pid may be another process's by the next session: a folder named by a pid
    that runs, but since another moment, is a gone session's; one named by the process that runs
    under it is a live one's, never reaped."""
    worker = ManagedProcess("worker", ["sleep", "300"], os.environ, tmp_path / "worker.log")
    live_pid = os.getpid()  # (this test's own process: a session that runs)
    root = tmp_path / "sessions"
    try:
        worker.start()
        line = f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} worker\n"
        for pid, started in ((live_pid, started_at(live_pid)),
                             (live_pid, started_at(live_pid) - 1)):
            (root / f"session-{pid}-{started}").mkdir(parents=True)
            (root / f"session-{pid}-{started}" / "processes").write_text(line)

        assert reap_sessions_gone(root) == ["worker"]
        wait_for(lambda: not worker.alive(), timeout=5, what="the worker to end")
        assert os.listdir(root) == [f"session-{live_pid}-{started_at(live_pid)}"]
    finally:
        worker.stop()
