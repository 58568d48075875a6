"""What a run killed outright left running, stopped by the next run in its folder.

A run stops its processes however it is told to end (Ctrl-C, SIGTERM, the terminal's hangup:
devstack.processes.ProcessGroup), but not when it is killed with no chance to (SIGKILL, the OOM
killer): each child runs in a session of its own, and outlives it. Left so, they hold `make run`'s
ports, so that the next run cannot start, and a relay of theirs may hold a service database's
leader lock, sending its rows to their own broker. So a run writes down each process as it starts
it, in its folder (`processes`), holding a lock on that list for as long as it runs (the kernel
lets go of it however the run ends), and removes the list once it has stopped them; the next run
in that folder takes the lock of a run that is gone and stops what its list names.

A process is named by its pid and the moment it started (/proc/<pid>/stat), so that a pid since
given to another process is never taken for it; each child leads a process group of its own, and
the whole group is stopped, as ProcessGroup stops it. A group whose leader has ended is not
looked for: its leader's pid may be another's by then. A pid and a start come again after a
reboot (.run is on disk), so the list begins with the boot it was written in (this_boot), and
a list of another boot names nothing that runs: nothing of it is signalled. (A list without
one, written before lists had one, is judged by pids and starts alone.)
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

# How long the processes left get to stop on their stop signal before they are killed.
STOP_TIMEOUT_SECONDS = 10.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# A list's first line: this, then the boot it was written in.
BOOT_LINE = "boot"
# The list's name in a run's folder.
RUN_RECORD = "processes"


class RunInTheWay(RuntimeError):
    """Another run's processes are in the way: it is still running, or they are another user's."""


@dataclass(frozen=True)
class RecordedProcess:
    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat, field 22)
    stop_signal: int
    name: str

    def line(self) -> str:
        return f"{self.pid} {self.started} {self.stop_signal} {self.name}\n"

    @classmethod
    def parse(cls, line: str) -> RecordedProcess | None:
        """The process a line names; None for a line a killed run left unfinished."""
        try:
            pid, started, stop_signal, name = line.rstrip("\n").split(" ", 3)
            return cls(int(pid), int(started), int(stop_signal), name)
        except ValueError:
            return None

    def running(self) -> bool:
        return started_at(self.pid) == self.started


def started_at(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot); None if it is gone (or a zombie, its
    parent yet to reap it: ended all the same)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # (the command name, in parentheses, may hold anything: the fields after it are split)
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def this_boot() -> str:
    """The first 8 hex digits of this boot's id (the kernel's boot_id, random each boot). A
    RuntimeError, saying so, where there is none to read: a system without Linux's /proc (macOS),
    on which a run could not tell its processes apart either (started_at)."""
    try:
        return BOOT_ID.read_text().strip()[:8]
    except OSError as exc:
        raise RuntimeError(f"devstack runs on Linux only: it needs /proc, and cannot read {BOOT_ID}"
                           f" here ({exc.strerror or exc})") from None


class RunRecord:
    """The list, at `path`, of the processes this run started, locked while the run goes on."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def begin(self) -> list[str]:
        """Take the list, stop what a run that is gone left running (the names of what was
        stopped), and start this run's list. Raises RunInTheWay if the run that holds the list is
        still running, or if what a gone run left is another user's to stop; a RuntimeError
        where there is no /proc (this_boot), before anything is touched."""
        boot = this_boot()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = self._locked()
        try:
            stopped = _stop(_still_running(record))
        except BaseException:
            record.close()
            raise
        record.seek(0)
        record.truncate()
        record.write(f"{BOOT_LINE} {boot}\n")
        record.flush()
        self._file = record
        return stopped

    def _locked(self):
        """The list, open and locked: RunInTheWay if another run holds it."""
        while True:
            record = open(self.path, "a+")
            try:
                fcntl.flock(record, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record.close()
                raise RunInTheWay(f"another run is using {self.path.parent}") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(record.fileno()).st_ino:
                    return record
            except FileNotFoundError:
                pass
            record.close()  # (a run ending removed it as this one opened it: open it anew)

    def note(self, pid: int, stop_signal: int, name: str) -> None:
        """Add a process this run has started."""
        started = started_at(pid)
        if started is not None and self._file is not None:  # (else it is gone already)
            self._file.write(RecordedProcess(pid, started, stop_signal, name).line())
            self._file.flush()

    def end(self) -> None:
        """This run has stopped what it started: the list goes, unless something on it still
        runs (a stop cut short), which the next run then stops."""
        if self._file is None:
            return
        if not _still_running(self._file):
            self.path.unlink(missing_ok=True)
        self._file.close()  # (and the lock with it)
        self._file = None


def _still_running(record) -> list[RecordedProcess]:
    """What the list, open, names that still runs: nothing, if it was written in another boot."""
    record.seek(0)
    lines = record.readlines()
    if lines and lines[0].startswith(f"{BOOT_LINE} ") and lines[0].split()[1:] != [this_boot()]:
        return []
    return [process for process in map(RecordedProcess.parse, lines)
            if process is not None and process.running()]


def _stop(left: list[RecordedProcess]) -> list[str]:
    """Stop each process of `left` and its group: its stop signal, then SIGKILL for a leader still
    running after STOP_TIMEOUT_SECONDS."""
    for process in left:
        _signal_group(process, process.stop_signal)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while any(process.running() for process in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in left:
        if process.running():  # (looked at again: an ended one's pid may be another's already)
            _signal_group(process, signal.SIGKILL)
    return [process.name for process in left]


def _signal_group(process: RecordedProcess, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise RunInTheWay(f"{process.name} (pid {process.pid}), left by a run that is gone, is"
                          " another user's to stop (a run as root, say)") from None
