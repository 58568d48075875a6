"""What a test session killed outright left running is stopped by the next session, and a session
still running is never reaped (tests/session_folders.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from devstack.leftovers import RunRecord, started_at, this_boot
from devstack.processes import ManagedProcess
from tests.pid_namespaces import pid_namespace, pid_namespaces_running
from tests.polling import wait_for
from tests.process_tools import end_child, gone, line_within, start_child
from tests.session_folders import CLAIMED, begin_session, reap_sessions_gone

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
    time.sleep(300)  # (lives on until killed: the scenario)
    """
)


def _session(root: Path) -> tuple[subprocess.Popen, list[int]]:
    session = start_child([sys.executable, "-c", SESSION, str(root)], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    pids = [int(line_within(session.stdout, 30, "a server's pid")) for _ in range(2)]
    assert line_within(session.stdout, 30, '"ready"').strip() == "ready"
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
            end_child(session)
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
        for started in (started_at(live_pid), started_at(live_pid) - 1):
            folder = root / _name(live_pid, started)
            folder.mkdir(parents=True)
            (folder / "processes").write_text(line)

        assert reap_sessions_gone(root) == ["worker"]
        wait_for(lambda: not worker.alive(), timeout=5, what="the worker to end")
        assert os.listdir(root) == [_name(live_pid, started_at(live_pid))]
    finally:
        worker.stop()


def _name(pid: int, started: int, namespace: str | None = None, boot: str | None = None) -> str:
    """The name of the folder of the session `pid` started at `started` (in this pid namespace
    and this boot, unless told others)."""
    return f"session-{pid}-{started}-{namespace or pid_namespace()}-{boot or this_boot()}"


# A session reaping `root` as soon as the file `go` is there; prints what went wrong, if anything.
REAPER = textwrap.dedent(
    """
    import os, sys, traceback
    from pathlib import Path
    from tests.session_folders import reap_sessions_gone
    root, go = Path(sys.argv[1]), Path(sys.argv[2])
    print("ready", flush=True)
    while not go.exists():
        pass
    try:
        reap_sessions_gone(root)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
    """
)


def test_two_sessions_beginning_at_once_reap_the_folders_of_those_gone_together(tmp_path):
    """Each folder is reaped by one of them: the other, finding it taken (renamed, removed),
    passes on, where it failed on a file the first had removed under it."""
    root = tmp_path / "sessions"
    gone_started = started_at(os.getpid()) - 1  # (this pid, another start: a session gone)
    for round_ in range(15):
        for number in range(6):
            folder = root / _name(os.getpid(), gone_started - number)
            for stack in ("e2e", "broker-outage"):
                logs = folder / "run" / stack / "logs"
                logs.mkdir(parents=True)
                (logs.parent / "processes").write_text("")
                for log in range(40):
                    (logs / f"{log}.log").write_text("a line\n")
            (folder / "processes").write_text("")
        go = tmp_path / f"go-{round_}"
        reapers = [start_child([sys.executable, "-c", REAPER, str(root), str(go)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
                   for _ in range(2)]
        for reaper in reapers:
            assert line_within(reaper.stdout, 30, '"ready"').strip() == "ready"
        go.touch()
        said = [reaper.communicate(timeout=60)[0] for reaper in reapers]
        assert said == ["", ""], said[0] or said[1]
        assert os.listdir(root) == []


def test_a_session_in_another_pid_namespace_leaves_this_ones_folders(tmp_path):
    """There, this namespace's pids are not to be seen (or are others'): it cannot tell a session
    that runs from one that is gone, so it leaves the folder and what its record names."""
    # (It fails, never skips, where it cannot run: as the suite's other tests that need root.)
    assert shutil.which("unshare") is not None and os.geteuid() == 0, "needs unshare, as root"
    worker = ManagedProcess("worker", ["sleep", "300"], os.environ, tmp_path / "worker.log")
    root = tmp_path / "sessions"
    own = root / _name(os.getpid(), started_at(os.getpid()))  # (this test's: it runs)
    try:
        worker.start()
        own.mkdir(parents=True)
        (own / "processes").write_text(
            f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} worker\n")
        subprocess.run(
            ["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-c",
             "import sys; from pathlib import Path; from tests.session_folders import"
             " begin_session; begin_session(Path(sys.argv[1])).end()", str(root)],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True,
            timeout=60)
        assert worker.alive()
        assert own.is_dir() and (own / "processes").read_text()
        assert reap_sessions_gone(root, namespace="4026500000") == []  # (nor a faked other)
        assert worker.alive() and own.is_dir()
    finally:
        worker.stop()


def test_the_folder_of_a_pid_namespace_ended_is_removed_and_its_records_not_read(tmp_path):
    """The folder of a session in a container sharing /tmp is not for a session of the host's
    namespace to reap by pids; but once that namespace has ended, nothing of it runs: its folder
    is removed as it is (what its record names, here a process that runs, is not signalled).
    One of a namespace still running is left."""
    # (It fails, never skips, where it cannot run: as the suite's other tests that need root.)
    assert shutil.which("unshare") is not None and os.geteuid() == 0, "needs unshare, as root"
    assert pid_namespaces_running() is not None, "needs to see every process's pid namespace"
    worker = ManagedProcess("worker", ["sleep", "300"], os.environ, tmp_path / "worker.log")
    saying_its_namespace = ["unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
                            "readlink /proc/self/ns/pid; exec sleep 300"]
    running = start_child(saying_its_namespace, stdout=subprocess.PIPE, text=True)
    root = tmp_path / "sessions"
    try:
        worker.start()
        running_namespace = line_within(running.stdout, 30, "its pid namespace").strip()[
            len("pid:["):-1]
        ended = subprocess.run(saying_its_namespace[:4] + ["readlink", "/proc/self/ns/pid"],
                               capture_output=True, text=True, check=True, timeout=60)
        ended_namespace = ended.stdout.strip()[len("pid:["):-1]
        folders = [root / _name(1, 1, namespace=namespace)
                   for namespace in (ended_namespace, running_namespace)]
        for folder in folders:
            folder.mkdir(parents=True)
            (folder / "processes").write_text(
                f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} worker\n")

        assert reap_sessions_gone(root) == []
        assert worker.alive()
        assert os.listdir(root) == [folders[1].name]
    finally:
        end_child(running)
        worker.stop()


def test_a_record_another_run_holds_keeps_the_folder_not_the_sessions_servers(tmp_path):
    """A stack's record still held (its run outlived the session) is left, and the folder with
    it, under its own name, for the next session; the session's own record is handled all the
    same, its server stopped."""
    worker = ManagedProcess("worker", ["sleep", "300"], os.environ, tmp_path / "worker.log")
    root = tmp_path / "sessions"
    folder = root / _name(os.getpid(), started_at(os.getpid()) - 1)  # (a session gone)
    stack = RunRecord(folder / "run" / "e2e" / "processes")
    try:
        worker.start()
        stack.begin()  # (held, as a stack's run still running holds it)
        (folder / "processes").write_text(
            f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} worker\n")

        assert reap_sessions_gone(root) == ["worker"]
        wait_for(lambda: not worker.alive(), timeout=5, what="the worker to end")
        assert os.listdir(root) == [folder.name]
        assert stack.path.is_file()
    finally:
        stack.end()
        worker.stop()


def test_a_folder_of_another_boot_is_removed_and_its_records_not_read(tmp_path):
    """After a reboot that keeps /tmp, a pid and its start come again: the folder named by this
    process, but of another boot, is a session's gone with that boot, and what its record names
    (a process that runs now, as pids and starts come again) is not to be signalled."""
    worker = ManagedProcess("worker", ["sleep", "300"], os.environ, tmp_path / "worker.log")
    root = tmp_path / "sessions"
    other_boot = "0" * 8 if this_boot() != "0" * 8 else "1" * 8
    pid = os.getpid()
    folders = [root / _name(pid, started_at(pid), boot=other_boot),  # (named as this one)
               root / _name(pid, 1, boot=other_boot),  # (as a session that does not run)
               root / f"{CLAIMED}-{pid}-{started_at(pid)}-{_name(pid, 2, boot=other_boot)}"]
    try:
        worker.start()
        for folder in folders:
            folder.mkdir(parents=True)
            (folder / "processes").write_text(
                f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} worker\n")

        record = begin_session(root)  # (its own folder made beside the one named as it)
        record.end()
        assert worker.alive()
        assert os.listdir(root) == [record.path.parent.name]
    finally:
        worker.stop()


def test_the_claim_of_a_session_gone_is_taken_over_and_a_running_ones_left(tmp_path):
    """A session killed as it reaped a folder leaves it claimed: the next reaps it. One still
    reaping it (this test's own process, as the claimer) is left to."""
    workers = [ManagedProcess(f"worker-{n}", ["sleep", "300"], os.environ,
                              tmp_path / f"worker-{n}.log") for n in range(2)]
    root = tmp_path / "sessions"
    pid = os.getpid()
    gone_started = started_at(pid) - 1  # (this pid, another start: a session gone)
    claims = [root / f"{CLAIMED}-{pid}-{claimer}-{_name(pid, gone_started - n)}"
              for n, claimer in enumerate((gone_started, started_at(pid)))]
    try:
        for worker, claim in zip(workers, claims):
            worker.start()
            claim.mkdir(parents=True)
            (claim / "processes").write_text(
                f"{worker.pid} {started_at(worker.pid)} {signal.SIGTERM} {worker.name}\n")

        assert reap_sessions_gone(root) == ["worker-0"]
        wait_for(lambda: not workers[0].alive(), timeout=5, what="the worker to end")
        assert os.listdir(root) == [claims[1].name]
        assert workers[1].alive()
    finally:
        for worker in workers:
            worker.stop()
