"""make run's supervision at its edges, with stand-ins for the stack (devstack.supervision, and
devstack.__main__.run's stop): what real processes do is in test_devstack_processes."""

from __future__ import annotations

import pytest

import devstack.__main__ as make_run
from devstack.supervision import RunMustStop, Supervisor


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
