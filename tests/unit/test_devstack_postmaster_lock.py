"""devstack.postmaster_lock's reading of a lock file and of the System V segments it names, and
its judging of files whose processes and segments are made up here (the whole of it, with real
servers: tests/integration/test_devstack_infra.py)."""

from __future__ import annotations

import re
import errno
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import postmaster_lock
from devstack.infra import free_port, wait_until
from devstack.postmaster_lock import (
    LOCK_FILE,
    PostmasterLock,
    clear_if_stale,
    postgres_on,
    processes_attached_to,
    server_may_run_on,
)
from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
_PROC_HEADER = ("       key      shmid perms                  size  cpid  lpid nattch   uid   gid"
                "  cuid  cgid      atime      dtime      ctime                   rss"
                "                  swap\n")


def test_a_segment_whose_key_is_past_2_to_the_31_is_found_though_the_two_write_it_apart(
        tmp_path, monkeypatch):
    """A server's key is its data directory's inode number as a 32-bit key_t: past 2**31 (a large
    file system's inodes), postmaster.pid writes it as an unsigned long (2**64 less), /proc as a
    negative int. Read apart, its segment was never found, and taken for gone while in use."""
    (tmp_path / LOCK_FILE).write_text(
        f"4242\n{tmp_path}\n1796511385\n60361\n\n127.0.0.1\n"
        f"{2**64 - 5:9d} {98315:9d}\nready   \n")
    segments = tmp_path / "shm"
    segments.write_text(
        _PROC_HEADER
        + "   1433715          4   600      56  2264 12397      5   101   104   101   104"
          " 1796511383 1796511383 1796511087  4096  0\n"
        + "        -5      98315   600      56  4242  4300      3  1001  1001  1001  1001"
          " 1796511385 1796511385 1796511385  4096  0\n")
    monkeypatch.setattr(postmaster_lock, "SYSV_SHARED_MEMORY", segments)

    lock = PostmasterLock.read(tmp_path)

    assert (lock.pid, lock.port) == (4242, 60361)
    assert processes_attached_to(lock.shared_memory) == 3
    assert processes_attached_to((2**32 - 5, 98316)) == 0  # (another id: gone)


def test_a_postgres_whose_data_directory_is_not_ours_to_read_is_one_that_cannot_be_told(
        tmp_path, a_postgres, monkeypatch):
    """As root with no CAP_SYS_PTRACE (Docker's default), another user's postgres's
    /proc/<pid>/cwd is not ours to read, and the directory its -D names may be under one we may
    not enter: the PermissionError of that stat went up through `make run`, which failed. Whether
    it is a server of the data directory cannot be told, and its file is left."""
    pid = a_postgres("-D", str(tmp_path / "theirs" / "pgdata"))
    _write_lock_file(tmp_path, pid)
    monkeypatch.setattr(os.path, "samefile", _not_ours_to_read)

    assert postgres_on(pid, tmp_path) is None
    assert clear_if_stale(tmp_path, "127.0.0.1").startswith(f"left {tmp_path / LOCK_FILE} ")
    assert (tmp_path / LOCK_FILE).exists()


def test_the_pid_a_single_user_postgres_writes_negated_is_read_as_its_own(tmp_path):
    """`postgres --single` writes its pid negated: read as it is, it named no process, and the
    file of a running single-user server was taken for one no server holds."""
    _write_lock_file(tmp_path, -4242)

    assert PostmasterLock.read(tmp_path).pid == 4242


def test_a_lock_file_naming_a_data_directory_whose_path_is_no_utf_8_is_read(tmp_path):
    """PostgreSQL writes the data directory's path as its bytes are: one not UTF-8 (a checkout
    under a Latin-1 name) made the file unreadable as text, and it was taken for one not whole."""
    (tmp_path / LOCK_FILE).write_bytes(
        b"4242\n/home/caf\xe9/pgdata\n1796511385\n60361\n\n127.0.0.1\n     1234        56\n")

    lock = PostmasterLock.read(tmp_path)

    assert (lock.pid, lock.port, lock.shared_memory) == (4242, 60361, (1234, 56))


@pytest.mark.parametrize("port", [0, 65536, 2**70, -5432])
def test_a_lock_file_naming_no_port_there_can_be_is_left_for_the_server_to_judge(tmp_path, port):
    """A port no server writes (none is past 65535 or below 1) is no server's file: devstack
    leaves it to the server to judge. Past a C long, the check of what listens there raised
    OverflowError, which went up through `make run`. Nor is it certain that no server runs on
    the data directory (server_may_run_on): it was taken for a file not whole, and once left a
    while, with no postgres found running there, the sweep of the folders killed runs left
    deleted the folder, though the file names a pid, and may be written over a server's."""
    _write_lock_file(tmp_path, _a_pid_gone(), port=port)
    _written_ago(tmp_path / LOCK_FILE, 60)

    assert clear_if_stale(tmp_path, "127.0.0.1") is None
    assert (tmp_path / LOCK_FILE).exists()
    assert PostmasterLock.read(tmp_path) is None
    assert server_may_run_on(tmp_path, "127.0.0.1") == (True, (
        f"its postmaster.pid names a port no server writes ('{port}'), so whether a server runs"
        " on it cannot be told; if none does, remove the file by hand"))


def test_a_lock_file_naming_a_postgres_whose_data_directory_cannot_be_told_is_judged_by_its_segment(
        tmp_path, a_postgres, monkeypatch):
    """As root with no CAP_SYS_PTRACE (Docker's default), a postgres's working directory is not
    ours to read, and a backend's command line (`postgres: user db ... idle`) names no data
    directory: a file naming another server's backend was kept, and the server refused to start
    over it. Whatever the pid is, a server running on the data directory wrote the file and is
    attached to the segment it names: none attached (98316 here), none runs, and the file goes;
    one attached, it stays; with no segment named, nothing tells, and it stays."""
    pid = a_postgres()
    monkeypatch.setattr(os.path, "samefile", _not_ours_to_read)
    what_it_is = (f"pid {pid} is a postgres whose data directory cannot be told (its working"
                  f" directory is not ours to read, and its command line names none, as a"
                  f" backend's does not)")
    path, port = tmp_path / LOCK_FILE, free_port()
    _segments_are(tmp_path, monkeypatch, (5432001, 98315, 1))

    _write_lock_file(tmp_path, pid, port, segment=(5432001, 98316))
    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"removed {path}, which no server holds: {what_it_is}; no process is attached to the"
        f" shared memory it names (key 5432001, id 98316)")
    assert not path.exists()

    _write_lock_file(tmp_path, pid, port, segment=(5432001, 98315))
    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"left {path} (pid {pid}) in place: its shared memory (key 5432001, id 98315) is in use"
        f" still (attached: 1), by a killed server's backends, say")

    _write_lock_file(tmp_path, pid, port)
    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"left {path} (pid {pid}) in place: it {what_it_is.removeprefix(f'pid {pid} ')}, and the"
        f" file names no shared memory to tell by")
    assert path.exists()


def test_a_lock_file_naming_a_segment_no_process_is_attached_to_goes_whatever_holds_its_port(
        tmp_path, monkeypatch):
    """With no process attached to the segment the file names, no server runs on the data
    directory, whatever listens on the port it names: devstack's ports are picked afresh each run,
    and a later run's Redis or broker may have it. Something there that did not say what it
    serves kept a file the server itself would have passed over."""
    _segments_are(tmp_path, monkeypatch)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # (never answers)
        port = listener.getsockname()[1]
        pid = _a_pid_gone()
        _write_lock_file(tmp_path, pid, port, segment=(5432001, 98315))

        assert clear_if_stale(tmp_path, "127.0.0.1") == (
            f"removed {tmp_path / LOCK_FILE}, which no server holds: pid {pid} is not running; no"
            f" process is attached to the shared memory it names (key 5432001, id 98315)")


def test_a_lock_file_naming_no_segment_is_judged_by_what_listens_on_its_port(
        tmp_path, monkeypatch):
    """A file naming no segment (its server ended before it made one) is kept while something
    listens on its port that does not say what it serves, and goes once nothing does."""
    path, pid, port = tmp_path / LOCK_FILE, _a_pid_gone(), free_port()
    # (A port of free_port's: once the listener has closed, the system gives it no other socket
    # bound to port 0, as it may a port of its own pick.)
    with socket.create_server(("127.0.0.1", port)):  # (never answers)
        _write_lock_file(tmp_path, pid, port)

        assert clear_if_stale(tmp_path, "127.0.0.1") == (
            f"left {path} (pid {pid}) in place: something listens on its port {port} and does not"
            f" say what it serves")

    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"removed {path}, which no server holds: pid {pid} is not running; it names no shared"
        f" memory, and nothing listens on its port {port}")


@pytest.mark.parametrize("text, holds", [
    ("", "empty"), ("\0" * 96, "blanks only"), ("4242\n/pgdata\n179651", "pid 4242 and no port"),
    ("42ab", "no pid"), ("0\n/pgdata\n1796511385\n60361\n", "pid 0")],
    ids=["empty", "zeros", "cut-short", "no-pid", "pid-0"])
def test_a_lock_file_not_whole_left_a_while_goes_when_no_postgres_runs_on_its_data_directory(
        tmp_path, text, holds):
    """A file with no pid, or a pid and no port, left by a crash as it was written: PostgreSQL
    refuses to start over it ("lock file ... is empty", "bogus data"), and devstack left it, so
    its server never started again. No server runs on the data directory, and the file was
    last written longer ago than a starting server's first write takes: it goes."""
    path = tmp_path / LOCK_FILE
    path.write_bytes(text.encode())
    _written_ago(path, 60)

    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"removed {path}, which no server holds: it is not whole ({holds}), was last written 60 s"
        f" ago, and no postgres runs on that data directory")
    assert not path.exists()


@pytest.mark.parametrize("written_ago, said", [
    (0, "was written 0 s ago"), (5, "was written 5 s ago"),
    (-3600, "is stamped in the future, which tells nothing of when it was written")])
def test_a_lock_file_not_whole_written_moments_ago_is_left_to_the_server_writing_it(
        tmp_path, written_ago, said):
    """A server starting makes the file empty and writes its first lines just after: a file not
    whole written moments ago (or at a time to come, which tells nothing) may be that server's,
    and stays, the line saying what to do if none is."""
    path = tmp_path / LOCK_FILE
    path.write_text("")
    _written_ago(path, written_ago)

    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"left {path} in place: it is not whole (empty), and {said}: a server starting on that"
        " data directory may be writing it; if none is, "
        + ("remove it by hand" if written_ago < 0 else "run again after 10 s"))
    assert path.exists()


def test_a_lock_file_not_whole_stays_while_a_postgres_runs_or_may_run_on_its_data_directory(
        tmp_path, a_postgres, monkeypatch):
    """Its pid names no process to judge: any postgres running on the data directory may be its
    server, and one whose data directory cannot be told may be; either keeps the file."""
    path = tmp_path / LOCK_FILE
    path.write_text("")
    _written_ago(path, 60)
    pid = a_postgres(cwd=tmp_path)

    assert _ago_said(clear_if_stale(tmp_path, "127.0.0.1")) == (
        f"left {path} in place: it is not whole (empty), was last written N s ago, and pid {pid}"
        " is a postgres running on that data directory")
    assert path.exists()

    monkeypatch.setattr(os.path, "samefile", _not_ours_to_read)
    assert _ago_said(clear_if_stale(tmp_path, "127.0.0.1")).startswith(
        f"left {path} in place: it is not whole (empty), was last written N s ago, and pid ")
    assert "is a postgres whose data directory cannot be told" in clear_if_stale(
        tmp_path, "127.0.0.1")
    assert path.exists()


def test_another_users_postgres_is_none_on_the_data_directory_whatever_it_runs_on(
        tmp_path, a_postgres, monkeypatch):
    """A postgres of a user who does not own the data directory (the system's own PostgreSQL, as
    user postgres) is none of its: PostgreSQL refuses a data directory its user does not own.
    Where its data directory could not be told (its working directory not ours to read, its
    backends naming none on their command lines), it kept every file not whole for ever. One of
    the directory's owner is still asked."""
    path = tmp_path / LOCK_FILE
    path.write_text("")
    _written_ago(path, 60)
    monkeypatch.setattr(os.path, "samefile", _not_ours_to_read)
    pid = a_postgres(cwd=Path("/"), uid=pwd.getpwnam("nobody").pw_uid)

    os.chown(tmp_path, pwd.getpwnam("nobody").pw_uid, -1)
    assert _ago_said(clear_if_stale(tmp_path, "127.0.0.1")) == (
        f"left {path} in place: it is not whole (empty), was last written N s ago, and pid {pid}"
        " is a postgres whose data directory cannot be told (its working directory is not ours to"
        " read, and its command line names none, as a backend's does not)")
    assert path.exists()

    os.chown(tmp_path, os.getuid(), -1)
    _written_ago(path, 60)  # (again: the first look may have taken a second on a busy machine)
    assert clear_if_stale(tmp_path, "127.0.0.1") == (
        f"removed {path}, which no server holds: it is not whole (empty), was last written 60 s"
        " ago, and no postgres runs on that data directory")
    assert not path.exists()


def test_a_server_may_run_on_a_data_directory_as_long_as_its_lock_file_is_not_certainly_stale(
        tmp_path, a_postgres, monkeypatch):
    """server_may_run_on, which the sweep of the folders killed runs left goes by (a folder a
    server may run on is another run's): a file naming a pid gone and a segment processes are
    attached to (a killed server's backends) may; a file not whole written moments ago may; with
    no file, or one not whole left a while, a postgres running on the folder may; else none."""
    assert server_may_run_on(tmp_path / "gone", "127.0.0.1") == (False, "it is not there")
    assert server_may_run_on(tmp_path, "127.0.0.1") == (
        False, "it has no postmaster.pid, and no postgres runs on that data directory")

    _write_lock_file(tmp_path, _a_pid_gone(), segment=(1234, 56))
    _segments_are(tmp_path, monkeypatch, (1234, 56, 2))
    may_run, why = server_may_run_on(tmp_path, "127.0.0.1")
    assert may_run and "is in use still (attached: 2)" in why
    _segments_are(tmp_path, monkeypatch, (1234, 56, 0))
    assert not server_may_run_on(tmp_path, "127.0.0.1")[0]

    path = tmp_path / LOCK_FILE
    path.write_text("")
    assert _ago_rounded(server_may_run_on(tmp_path, "127.0.0.1")) == (True, (
        "its postmaster.pid is not whole (empty), and was written N s ago: a server starting on"
        " that data directory may be writing it; if none is, run again after 10 s"))
    _written_ago(path, 60)
    assert _ago_rounded(server_may_run_on(tmp_path, "127.0.0.1")) == (False, (
        "its postmaster.pid is not whole (empty), was last written N s ago, and no postgres runs"
        " on that data directory"))
    pid = a_postgres(cwd=tmp_path)
    _written_ago(path, 60)  # (again: starting it may have taken a second on a busy machine)
    assert _ago_rounded(server_may_run_on(tmp_path, "127.0.0.1")) == (True, (
        f"its postmaster.pid is not whole (empty), was last written N s ago, and pid {pid} is a"
        " postgres running on that data directory"))
    path.unlink()
    assert server_may_run_on(tmp_path, "127.0.0.1") == (True, (
        f"it has no postmaster.pid, and pid {pid} is a postgres running on that data directory"))


def _written_ago(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


@pytest.fixture
def a_postgres():
    """Starts a process whose program (comm) is `postgres`, with the arguments given (a Python
    asleep, renamed), in directory `cwd` if given, as user `uid` if given, and returns its pid;
    each is killed after the test."""
    started = []

    def start(*arguments: str, cwd: Path | None = None, uid: int | None = None) -> int:
        # (As `uid` once started, its modules loaded: that user may not read their directory.
        # Changing user lets go of the kernel's kill as this process ends: asked for again.)
        code = _NAMED_POSTGRES.replace(
            "# (as root)", "" if uid is None else f"os.setuid({uid}); die_with_parent(parent)")
        process = start_child([sys.executable, "-c", code, *arguments], stdin=subprocess.DEVNULL,
                              cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        started.append(process)
        wait_until(lambda: Path(f"/proc/{process.pid}/comm").read_text() == "postgres\n", 10,
                   0.02, "the process to be named postgres")
        return process.pid

    yield start
    for process in started:
        process.kill()
        process.wait()


_NAMED_POSTGRES = ("import ctypes, os, time\n"
                   "from tests.process_tools import die_with_parent\n"
                   "parent = os.getppid()\n"
                   "# (as root)\n"
                   "ctypes.CDLL(None).prctl(15, b'postgres', 0, 0, 0)  # PR_SET_NAME\n"
                   "time.sleep(300)\n")  # (lives on until killed)


def _a_pid_gone() -> int:
    process = start_child(["true"])
    process.wait()
    return process.pid


def _segments_are(tmp_path: Path, monkeypatch, *segments: tuple[int, int, int]) -> None:
    """/proc/sysvipc/shm lists these segments, (key, shmid, processes attached) each."""
    listing = tmp_path / "shm"
    listing.write_text(_PROC_HEADER + "".join(
        f"{key:10d} {shmid:10d}   600      56  4242  4300 {attached:6d}  1001  1001  1001  1001"
        f" 1796511385 1796511385 1796511385  4096  0\n" for key, shmid, attached in segments))
    monkeypatch.setattr(postmaster_lock, "SYSV_SHARED_MEMORY", listing)


def _not_ours_to_read(path, other_path):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _write_lock_file(pgdata: Path, pid: int | str, port: int | str = 60361,
                     segment: tuple[int, int] | None = None) -> None:
    """A postmaster.pid as a server writes it (with no shared memory line until it has made its
    segment)."""
    lines = [pid, pgdata, 1796511385, port, "", "127.0.0.1"]
    if segment is not None:
        lines += [f"{segment[0]:9d} {segment[1]:9d}", "ready   "]
    (pgdata / LOCK_FILE).write_text("".join(f"{line}\n" for line in lines))


def _ago_rounded(judged: tuple[bool, str]) -> tuple[bool, str]:
    """`judged` with its "<n> s ago" written "N s ago" (_ago_said)."""
    return judged[0], _ago_said(judged[1])


def _ago_said(line: str) -> str:
    """`line` with its "<n> s ago" written "N s ago": the seconds read as whole ones can be one
    more than the test set on a busy machine."""
    return re.sub(r"\d+ s ago", "N s ago", line)
