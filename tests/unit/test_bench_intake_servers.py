"""The servers bench.intake starts beside the stack's own (the baseline, the floors) are started
as the stack's processes: in the run's record (devstack.leftovers), so that a bench killed outright
(SIGKILL, the OOM killer) has them stopped by the next run, not left serving, and holding their
database connections, for good."""

from __future__ import annotations

import os

from bench.intake import _serve
from devstack.leftovers import RecordedProcess, RunRecord
from devstack.processes import ProcessGroup
from devstack.stack import RUN_RECORD, Stack

APP = "tests.e2e.server_software_app:answer_the_server_software"


def test_an_intake_server_is_in_the_runs_record_as_it_serves(tmp_path):
    stack = Stack(tmp_path)
    record = RunRecord(tmp_path / RUN_RECORD)
    record.begin()
    stack._group = ProcessGroup(handle_signals=False, record=record)
    stack._env = {"PATH": os.environ.get("PATH", "")}
    started = []
    try:
        _url, server = _serve("baseline-api", APP, stack, started)
        recorded = [RecordedProcess.parse(line) for line in
                    (tmp_path / RUN_RECORD).read_text().splitlines()[1:]]
        assert [(p.pid, p.name) for p in recorded] == [(server.pid, "baseline-api")]
        assert started == [server] and server in stack.processes
    finally:
        stack.stop()
        for process in started:  # (stopped by the stack's stop: this stops what it left)
            process.stop()
    assert not server.alive()
