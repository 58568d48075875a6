"""Each test session's folder, in a fixed place of the user's, where what it starts is written
down; and what a session killed outright left running, stopped by the next.

A session stops the servers and stacks it started however it is told to end (Ctrl-C, SIGTERM, a
hangup: tests/signals_end_the_run.py), but not when it is killed with no chance to (SIGKILL, a
CI job's hard kill): each runs in a session of its own, and outlives it. So a session keeps its
run folder, its embedded PostgreSQL's data and its record of the servers it starts (`processes`,
devstack.leftovers' RunRecord, locked while it runs) in a folder of its own under SESSIONS_ROOT,
named by the session's pid and the moment it started; each stack it starts keeps its own record
in its run folder, under it. As a session begins, it stops what every record in the folder of a
session that is gone names, and removes that folder.

Several sessions may run at once on one machine (each checkout's, say): a session's folder is
only ever reaped once its pid no longer runs the process that made it (a pid since given to
another process does not keep it), and a record another session holds (reaping it first) is
passed over. The folder of a session that ended as it should is removed by the next, so its logs
stay until then.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from devstack.leftovers import RunInTheWay, RunRecord, started_at

SESSIONS_ROOT = Path(tempfile.gettempdir()) / f"hseshop-tests-{os.getuid()}"
# The session's record of the servers it starts, in its folder.
SESSION_RECORD = "processes"


def begin_session(root: Path = SESSIONS_ROOT) -> RunRecord:
    """Stop what the sessions that are gone left running, and begin this session's record, in a
    folder of its own under `root` (its parent the session's folder)."""
    _make_own_folder(root)
    pid = os.getpid()
    folder = root / _folder_name(pid, started_at(pid))
    folder.mkdir()
    stopped = reap_sessions_gone(root)
    if stopped:
        print(f"[tests] stopped what a test session killed before left running: "
              f"{', '.join(stopped)}", file=sys.stderr, flush=True)
    record = RunRecord(folder / SESSION_RECORD)
    record.begin()
    return record


def reap_sessions_gone(root: Path = SESSIONS_ROOT) -> list[str]:
    """Stop what every record names in the folder of each session under `root` that no longer
    runs, and remove the folder; the names of what was stopped."""
    stopped: list[str] = []
    for folder in sorted(root.iterdir()):
        owner = _owner(folder.name)
        if owner is None or started_at(owner[0]) == owner[1]:
            continue  # (not a session's, or its session still runs)
        try:
            stopped += _reaped(folder)
        except RunInTheWay:
            continue  # (another session reaps it now)
        shutil.rmtree(folder, ignore_errors=True)
    return stopped


def _reaped(folder: Path) -> list[str]:
    """Stop what the records in `folder` name: its stacks' first, then the session's own."""
    records = [path for path in folder.rglob(SESSION_RECORD) if path.is_file()]
    records.sort(key=lambda path: len(path.parts), reverse=True)
    stopped = []
    for path in records:
        record = RunRecord(path)
        stopped += record.begin()
        record.end()
    return stopped


def _folder_name(pid: int, started: int | None) -> str:
    return f"session-{pid}-{started}"


def _owner(name: str) -> tuple[int, int] | None:
    """The pid, and the moment it started, of the session whose folder is named `name`."""
    prefix, _, rest = name.partition("-")
    pid, _, started = rest.partition("-")
    if prefix != "session" or not pid.isdigit() or not started.isdigit():
        return None
    return int(pid), int(started)


def _make_own_folder(root: Path) -> None:
    """`root`, made if missing, and refused unless it is the user's own folder: under /tmp
    another user could have made it first, or put a link there."""
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    found = os.lstat(root)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        raise RuntimeError(f"{root} is not a folder of this user's: move it away to run the tests")
