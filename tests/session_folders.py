"""Each test session's folder, in a fixed place of the user's, where what it starts is written
down; and what a session killed outright left running, stopped by the next.

A session stops the servers and stacks it started however it is told to end (Ctrl-C, SIGTERM, a
hangup: tests/signals_end_the_run.py), but not when it is killed with no chance to (SIGKILL, a CI
job's hard kill): each runs in a session of its own, and outlives it. So a session keeps its run
folder, its embedded PostgreSQL's data and its record of the servers it starts (`processes`,
devstack.leftovers' RunRecord, locked while it runs) in a folder of its own under SESSIONS_ROOT,
named by the session's pid, the moment it started, its pid namespace and the boot it runs in; each
stack it starts keeps its own record in its run folder, under it. As a session begins, once its own
record is made and locked, it stops what every record in the folder of a session that is gone names,
and removes that folder.

A pid and a start (clock ticks after boot), and a pid namespace's number (the host's is the same
every boot), come again after a reboot that keeps /tmp (on disk, as RHEL's): an old record could
name a new process, and a new session's folder be named as an old one. So a folder is named by
the boot too (the first 8 hex digits of the kernel's boot_id, random each boot: that an old one's
matches this boot's is a chance in 4 billion, and even then only a pid and start alike as well
would do harm), and the folder of another boot is removed without its records read: nothing they
name can still run.

Several sessions may run at once on one machine (each checkout's, say): a session's folder is
only ever reaped once its pid no longer runs the process that made it (a pid since given to
another process does not keep it), and only by a session of its pid namespace (in a container
sharing /tmp, say, the host's pids are not to be seen: it would take every one for gone). The
folder of a pid namespace that has ended (the container's gone) is removed as it is, as one of
another boot is: nothing of it runs; but only by a session that sees every namespace running,
one of the host's (tests/pid_namespaces.py), and so never in a container. Two
sessions beginning at once do not reap one folder together: each claims a folder first by
renaming it (`.reaping-<its pid>-<its start>-<the folder's name>`), which only one can do; a
claim whose session is gone is taken over as a session's folder is. A folder is removed only
once none of its records is left: a record another run still holds, or naming a process that
outlived its SIGKILL, keeps it, under its own name again, for the next session to try. The folder
of a session that ended as it should is removed by the next, so its logs stay until then.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from devstack.leftovers import RunInTheWay, RunRecord, started_at, this_boot
from tests.pid_namespaces import pid_namespace, pid_namespaces_running

SESSIONS_ROOT = Path(tempfile.gettempdir()) / f"hseshop-tests-{os.getuid()}"
# The session's record of the servers it starts, in its folder.
SESSION_RECORD = "processes"
# A folder a session has claimed to reap: this, its pid and start, then the folder's own name.
CLAIMED = ".reaping"


def begin_session(root: Path = SESSIONS_ROOT) -> RunRecord:
    """Begin this session's record, in a folder of its own under `root` (its parent the session's
    folder), then stop what the sessions that are gone left running."""
    _make_own_folder(root)
    pid = os.getpid()
    folder = root / _folder_name(pid, started_at(pid), pid_namespace(), this_boot())
    folder.mkdir()
    record = RunRecord(folder / SESSION_RECORD)
    record.begin()
    stopped = reap_sessions_gone(root)
    if stopped:
        print(f"[tests] stopped what a test session killed before left running: "
              f"{', '.join(stopped)}", file=sys.stderr, flush=True)
    return record


def reap_sessions_gone(root: Path = SESSIONS_ROOT, namespace: str | None = None) -> list[str]:
    """Stop what every record names in the folder of each session of this pid namespace
    (`namespace`: another's, for a test) under `root` that no longer runs, and remove the
    folder; remove every folder of another boot, or of a pid namespace seen to have ended, as
    it is; the names of what was stopped."""
    namespace = pid_namespace() if namespace is None else namespace
    boot = this_boot()
    pid = os.getpid()
    claim_prefix = f"{CLAIMED}-{pid}-{started_at(pid)}-"
    stopped: list[str] = []
    folders = sorted(root.iterdir())
    # (looked at once the folders are listed: the namespace of a session that had made one by
    # then, if it runs still, is seen to)
    namespaces_running = pid_namespaces_running()
    for folder in folders:
        claimer, name = _claim(folder.name)
        owner = _owner(name)
        if owner is not None and (owner[3] != boot or (namespaces_running is not None
                                                       and owner[2] not in namespaces_running)):
            shutil.rmtree(folder, ignore_errors=True)  # (nothing of it runs)
            continue
        if owner is None or owner[2] != namespace or _runs(owner):
            continue  # (not a session's, another namespace's, or its session still runs)
        if claimer is not None and _runs(claimer):
            continue  # (another session, running, reaps it now)
        claimed = root / f"{claim_prefix}{name}"
        try:
            folder.rename(claimed)
        except FileNotFoundError:
            continue  # (another session claimed it first)
        stopped += _reaped(claimed, root / name)
    return stopped


def _reaped(claimed: Path, named: Path) -> list[str]:
    """Stop what the records in the `claimed` folder name, its stacks' first, then the
    session's own, and remove the folder once none is left; else put it back as `named`."""
    try:
        records = [path for path in claimed.rglob(SESSION_RECORD) if path.is_file()]
    except FileNotFoundError:
        records = []  # (a part of it gone meanwhile: what is left is looked for below)
    records.sort(key=lambda path: len(path.parts), reverse=True)
    stopped = []
    for path in records:
        record = RunRecord(path)
        try:
            stopped += record.begin()
        except (RunInTheWay, FileNotFoundError):
            continue  # (left for the next session: the others are stopped all the same)
        record.end()
    try:
        left = any(path.is_file() for path in claimed.rglob(SESSION_RECORD))
    except FileNotFoundError:
        left = False
    if not left:
        shutil.rmtree(claimed, ignore_errors=True)
        return stopped
    try:
        claimed.rename(named)
    except OSError:
        pass  # (left claimed: the claim of a session gone, taken over by the next)
    return stopped


def _folder_name(pid: int, started: int | None, namespace: str, boot: str) -> str:
    return f"session-{pid}-{started}-{namespace}-{boot}"


def _claim(name: str) -> tuple[tuple[int, int] | None, str]:
    """The pid and start of the session that claimed the folder named `name` (None if it is not
    a claim), and the name of the session's folder it was."""
    prefix, _, rest = name.partition("-")
    pid, _, rest = rest.partition("-")
    started, _, session_name = rest.partition("-")
    if prefix != CLAIMED or not pid.isdigit() or not started.isdigit():
        return None, name
    return (int(pid), int(started)), session_name


def _owner(name: str) -> tuple[int, int, str, str] | None:
    """The pid, the moment it started, the pid namespace and the boot of the session whose folder
    is named `name`."""
    parts = name.split("-")
    if len(parts) != 5 or parts[0] != "session" or not all(map(str.isdigit, parts[1:4])):
        return None
    return int(parts[1]), int(parts[2]), parts[3], parts[4]


def _runs(process: tuple[int, int] | tuple[int, int, str, str]) -> bool:
    """Whether the process named by its pid and the moment it started still runs."""
    return started_at(process[0]) == process[1]


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
