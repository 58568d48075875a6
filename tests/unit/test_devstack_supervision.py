"""make run's supervision at its edges, with stand-ins for the stack (devstack.supervision, and
devstack.__main__.run's stop): what real processes do is in test_devstack_processes."""

from __future__ import annotations

import threading

import pytest

import devstack.__main__ as make_run
from devstack.database_claim import Kept
from devstack.supervision import CLAIM_LOOK_SECONDS, RunMustStop, Supervisor


class _DeadWorker:
    name = "orders-worker"
    returncode = -9

    def __init__(self, log_path):
        self.log_path = log_path

    def died(self) -> bool:
        return True

    def log_tail(self, lines: int) -> str:
        return "MemoryError\n"


def test_a_process_that_cannot_be_started_again_stops_the_run_saying_why(tmp_path):
    """Its start failing (no memory left to fork, its executable gone), the run stops in a line,
    where the OSError went up through make run as a traceback."""
    class NoMemoryToFork:
        processes = [_DeadWorker(tmp_path / "orders-worker.log")]
        holding_data: list = []

        def start_again(self, process):
            raise OSError(12, "Cannot allocate memory")

    said = []
    with pytest.raises(RunMustStop) as stopped:
        Supervisor(NoMemoryToFork(), said.append).look()
    assert str(stopped.value) == (
        "orders-worker could not be started again: [Errno 12] Cannot allocate memory")
    assert said == [f"orders-worker exited with code -9 (SIGKILL): starting it again; the last"
                    f" lines of {tmp_path / 'orders-worker.log'}:\n    MemoryError"]


def test_a_ctrl_c_during_a_stop_the_run_began_itself_still_ends_it_as_every_stop(
        tmp_path, monkeypatch, capsys):
    """A process keeps dying and the run stops; a Ctrl-C during that stop's drain (its handler
    stops the rest at once, then raises) left run() from the middle of its stop: the settings
    file, which holds the secrets, was left, and "stopped." never said."""
    class KeepsDyingThenCtrlC(make_run.Stack):
        def start(self, timeout=60):
            return self

        @property
        def processes(self):
            return []

        def write_env_file(self, path):
            path.write_text("INTERNAL_AUTH_SECRET=s3cret\n")

        def stop(self):
            raise KeyboardInterrupt

    def keeps_dying(self):
        raise RunMustStop("orders-api exited with code 1, 3 deaths within 60 s: stopping the run")

    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", KeepsDyingThenCtrlC)
    monkeypatch.setattr(make_run, "print_urls", lambda stack, env_file: None)
    monkeypatch.setattr(make_run.Supervisor, "look", keeps_dying)

    with pytest.raises(KeyboardInterrupt):
        make_run.run()

    assert not (tmp_path / ".run" / "env").exists()
    assert capsys.readouterr().err.splitlines() == [
        "[devstack] orders-api exited with code 1, 3 deaths within 60 s: stopping the run",
        "[devstack] stopped."]


def test_a_look_at_the_claim_that_does_not_end_holds_up_no_look_of_the_supervisor_s(tmp_path):
    """Its PostgreSQL frozen (SIGSTOP, `docker pause`: its kernel still acknowledges), a look at
    the claim waits with no limit: on the supervisor's thread, it stopped the logs followed and
    the dead processes started again, and Ctrl-C, which cannot interrupt it, with them
    (test_devstack_database_claim has it against a PostgreSQL)."""
    class NoProcesses:
        processes: list = []
        holding_data: list = []

    class FrozenUntilLetGo:
        what = "the databases hseshop_orders at postgresql://postgres@127.0.0.1:5432"

        def __init__(self):
            self.let_go = threading.Event()

        def keep(self) -> Kept:
            self.let_go.wait()
            return Kept.HELD

    claim = FrozenUntilLetGo()
    now = [0.0]
    supervisor = Supervisor(NoProcesses(), [].append, clock=lambda: now[0], claim=claim)
    looks = 0

    def look_on() -> None:
        nonlocal looks
        for _ in range(3):
            now[0] += CLAIM_LOOK_SECONDS
            supervisor.look()
            looks += 1

    looking = threading.Thread(target=look_on, daemon=True)
    looking.start()
    looking.join(1)
    claim.let_go.set()
    assert looks == 3
