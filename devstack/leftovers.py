"""What a run killed outright left running, stopped by the next run in its folder.

A run stops its processes however it is told to end (Ctrl-C, SIGTERM, the terminal's hangup:
devstack.processes.ProcessGroup), but not when it is killed with no chance to (SIGKILL, the OOM
killer): each child runs in a session of its own, and outlives it. Left so, they hold `make run`'s
ports, so that the next run cannot start, and a relay of theirs may hold a service database's
leader lock, sending its rows to their own broker. So a run writes down each process it starts,
in its folder (`processes`), and removes the list once it has stopped them; the next run in that
folder finds the list of a run that is gone and stops what it names.

A process is named by its pid and the moment it started (/proc/<pid>/stat), so that a pid since
given to another process is never taken for it; each child leads a process group of its own, and
the whole group is stopped, as ProcessGroup stops it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

# How long the processes left get to stop on their stop signal before they are killed.
STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Noted:
    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat, field 22)
    stop_signal: int
    name: str

    def line(self) -> str:
        return f"{self.pid} {self.started} {self.stop_signal} {self.name}\n"

    @classmethod
    def parse(cls, line: str) -> Noted:
        pid, started, stop_signal, name = line.rstrip("\n").split(" ", 3)
        return cls(int(pid), int(started), int(stop_signal), name)

    def running(self) -> bool:
        return started_at(self.pid) == self.started


def started_at(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # (the command name, in parentheses, may hold spaces: the fields after it are split)
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class RunRecord:
    """The list, at `path`, of the processes this run started; its first line names the run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def begin(self) -> list[str]:
        """Stop what a run that is gone left running (the names of what was stopped), and start
        this run's list. Raises RuntimeError if the run that wrote the list is still running."""
        stopped: list[str] = []
        if self.path.exists():
            owner, *left = self.path.read_text().splitlines(keepends=True)
            owner = Noted.parse(owner)
            if owner.running():
                raise RuntimeError(f"another run (pid {owner.pid}) is using {self.path.parent}")
            stopped = _stop([noted for noted in map(Noted.parse, left) if noted.running()])
        me = os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(Noted(me, started_at(me), 0, "run").line())
        return stopped

    def note(self, pid: int, stop_signal: int, name: str) -> None:
        """Add a process this run has started."""
        started = started_at(pid)
        if started is not None:  # (else it is gone already)
            with open(self.path, "a") as record:
                record.write(Noted(pid, started, stop_signal, name).line())

    def end(self) -> None:
        """This run has stopped what it started: nothing is left to stop."""
        self.path.unlink(missing_ok=True)


def _stop(left: list[Noted]) -> list[str]:
    """Stop each process of `left` and its group: its stop signal, then SIGKILL for what is still
    running after STOP_TIMEOUT_SECONDS."""
    for noted in left:
        _signal_group(noted.pid, noted.stop_signal)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while any(noted.running() for noted in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    for noted in left:
        # (the group may outlive its leader: children of a killed master share it)
        _signal_group(noted.pid, signal.SIGKILL)
    return [noted.name for noted in left]


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
