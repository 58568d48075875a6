"""An embedded PostgreSQL's lock file (postmaster.pid): whose it is, and removing one no server
holds any more.

A server that ends without its shutdown (the machine rebooted, SIGKILL) leaves postmaster.pid in
its data directory. The next server started there refuses to start ("lock file "postmaster.pid"
already exists") whenever the pid the file names is alive and the server may signal it
(kill(pid, 0) succeeding: a process of the server's own user), whatever that process is. After a
reboot that pid is often another process's: the user's own shell, an editor; as root, where the
server runs as EMBEDDED_POSTGRES_USER, another checkout's server or one of its backends.
devstack's server then never started again until someone removed the file by hand.

So devstack removes the file, saying so, when it is certain no server runs on the data directory:
- the pid it names is no postgres running there: it is gone, its program is not `postgres`, or
  its working directory (where a server moves as it starts) is another, or, where that is not
  ours to read (root with no CAP_SYS_PTRACE, in a container), its `-D` names another;
- and no process is attached to the System V segment it names (the interlock every process of a
  server stays attached to, orphaned backends of a killed one too: PostgreSQL's own check). A
  server running there wrote the file, so this alone tells where the pid cannot (a backend's
  command line names no `-D`), and what listens on the file's port says nothing more (a later
  run's Redis or broker, say: devstack's ports are picked afresh each run);
- or, with no segment named (its server ended before it made one), the pid is no postgres of
  that directory, and nothing listens on the port it names, or what does is a server of another
  data directory.
Whatever cannot be told is no certainty: the file is left, for the server to judge.

A file not whole, with no pid, or a pid and no port (empty, cut short, or holes of zeros: left by
a crash of the machine, or of a server, as it was written), is read by none of the rules above,
which go by its pid, its port and its segment. One with no pid PostgreSQL refuses too ("lock
file "postmaster.pid" is empty", "bogus data in lock file"; another server may be starting), so
devstack's server never started again. A server moves to its data directory, makes the file
empty (only if there is none), and writes its first five lines, the pid and the port among them,
in one write just after; later it writes it again from its start, whole, never shorter. So a
file not whole is a server's only in the moment between its making and that first write, or was
left so by a crash. devstack removes such a file, saying so, only when both tell that no server
holds it:
- it was last written NOT_WHOLE_FOR_SECONDS ago or longer (no start stays that long between the
  two), a time stamp in the future being no such certainty;
- and no process is a postgres running on the data directory (every process of the data
  directory's owner named `postgres` judged as a file's pid is above: a server paused between
  the two is one, its working directory the data directory already; another user's is none,
  PostgreSQL refusing a data directory its user does not own); one whose data directory cannot
  be told, or whose program cannot be read, keeps the file.
A file whole but no server's (its port line no port a server writes: 0, 70000) is read by none
of these rules either. A server running on the data directory wrote its own file and keeps it,
so the pid and segment such a file names tell nothing of one running there (it may have been
written over a running server's). It is left, for the server to judge (PostgreSQL goes by its
pid and segment, not its port), and it is no certainty that no server runs on the data
directory (server_may_run_on, by which a data directory killed runs left is deleted).
Between the last look at the file and its removal (microseconds) a server may yet start there and
make a file of its own, which goes in its place: a second server started on the directory then
finds the first's shared memory in use, as PostgreSQL checks whatever its lock file says, and
refuses to start, so that no two run on it.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.leftovers import started_at
from devstack.ports import port_open

LOCK_FILE = "postmaster.pid"
# Its lines (PostgreSQL's LOCK_FILE_LINE_*, counted here from 0).
_PID_LINE, _PORT_LINE, _SHARED_MEMORY_LINE = 0, 3, 6
# Every System V shared memory segment: key, shmid, perms, size, cpid, lpid, nattch, ...
SYSV_SHARED_MEMORY = Path("/proc/sysvipc/shm")
# A key_t is 32 bits: the file writes it as an unsigned long, /proc as a signed int.
_KEY_BITS = 0xFFFFFFFF
# How long a file not whole must have been left as it is before it may go (the module's
# docstring): a starting server writes its first lines microseconds after making it, so this is
# margin for a machine under load.
NOT_WHOLE_FOR_SECONDS = 10.0
# shmctl(2)'s command that removes a segment (sys/ipc.h), once the last process detaches.
_IPC_RMID = 0


@dataclass(frozen=True)
class PostmasterLock:
    """What a data directory's postmaster.pid says, as far as devstack reads it."""

    text: str
    pid: int
    port: int
    shared_memory: tuple[int, int] | None  # (key, shmid) of its System V segment, once made

    @classmethod
    def read(cls, pgdata: Path) -> PostmasterLock | None:
        """None with no file, or with one not whole (a server writing it as it starts, or one
        ended as it did: clear_if_stale's _clear_if_not_whole) or not a server's (left for the
        server to judge)."""
        try:
            text = _text_of(pgdata / LOCK_FILE)
            lines = text.splitlines()
            # (`postgres --single` writes its pid negated)
            pid, port = abs(int(lines[_PID_LINE])), int(lines[_PORT_LINE])
        except (OSError, IndexError, ValueError):
            return None
        if pid == 0 or not 1 <= port <= 65535:
            return None
        try:
            key, shmid = map(int, lines[_SHARED_MEMORY_LINE].split())
            shared_memory = (key & _KEY_BITS, shmid)
        except (IndexError, ValueError):
            shared_memory = None
        return cls(text, pid, port, shared_memory)


def postgres_on(pid: int, pgdata: Path) -> bool | None:
    """Whether process `pid` is a postgres of data directory `pgdata` (see the module's
    docstring); None if that cannot be told."""
    return _postgres_on_and_what_it_is(pid, pgdata)[0]


def _postgres_on_and_what_it_is(pid: int, pgdata: Path) -> tuple[bool | None, str]:
    """postgres_on's answer, and what the process is, in words ("pid 42 ...")."""
    try:
        program = Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:  # (ended meanwhile)
        return False, "is not running"
    if program != "postgres":
        return False, f"is `{program}`, no postgres of that data directory"
    return _a_postgres_judged(pid, pgdata)


def _a_postgres_judged(pid: int, pgdata: Path) -> tuple[bool | None, str]:
    """_postgres_on_and_what_it_is's answer for a process whose program is `postgres`."""
    proc = Path(f"/proc/{pid}")
    if started_at(pid) is None:  # (a zombie too: a server no more, though kill(pid, 0) finds it)
        return False, "is not running"
    try:
        return _postgres_on_it(os.path.samefile(proc / "cwd", pgdata))
    except FileNotFoundError:  # (ended meanwhile)
        return False, "is not running"
    except OSError:  # (not ours to read: as root with no CAP_SYS_PTRACE, in a container)
        pass
    directory = _data_directory_argument(pid)
    if directory is None:
        return None, ("is a postgres whose data directory cannot be told (its working directory"
                      " is not ours to read, and its command line names none, as a backend's"
                      " does not)")
    try:
        return _postgres_on_it(os.path.samefile(directory, pgdata))
    except FileNotFoundError:  # (pgdata is there: so that is another)
        return False, "is a postgres of another data directory"
    except OSError as error:  # (under a directory not ours to enter)
        return None, (f"is a postgres whose data directory cannot be told (its working directory"
                      f" is not ours to read, nor the one its command line names:"
                      f" {error.strerror})")


def _postgres_on_it(same_directory: bool) -> tuple[bool, str]:
    if same_directory:
        return True, "is a postgres running on that data directory"
    return False, "is a postgres of another data directory"


def _data_directory_argument(pid: int) -> str | None:
    """The absolute directory `-D` names in the command line of `pid`, if it does."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for flag, value in zip(argv, argv[1:]):
        if flag == "-D":
            directory = value
        elif flag.startswith("-D"):
            directory = flag[2:]
        else:
            continue
        return directory if directory.startswith("/") else None
    return None


def clear_if_stale(pgdata: Path, host: str) -> str | None:
    """Remove pgdata's postmaster.pid if no server holds it (the module's docstring says when it
    is certain), and return the line that says what was done and why; None with no file."""
    lock = PostmasterLock.read(pgdata)
    if lock is None:
        return _clear_if_not_whole(pgdata)
    path = pgdata / LOCK_FILE
    held, why = _judged(lock, pgdata, host)
    if held:
        return f"left {path} (pid {lock.pid}) in place: {why}"
    # (A server started meanwhile would have written its own: only the file judged goes.)
    if PostmasterLock.read(pgdata) != lock:
        return f"left {path} in place: it changed as it was read"
    # (Nor can one start between that reading and the unlink: runs in one folder, whose servers
    # alone use its data directory, take turns, RunRecord's lock held by each.)
    path.unlink(missing_ok=True)
    return f"removed {path}, which no server holds: {why}"


def server_may_run_on(pgdata: Path, host: str) -> tuple[bool, str]:
    """Whether a server may be running on `pgdata` (False only when it is certain none is, by the
    rules clear_if_stale removes a file by), and why, in words; False for a folder not there. A
    file whole but no server's, which clear_if_stale leaves for the server to judge, is no
    certainty either (the module's docstring)."""
    lock = PostmasterLock.read(pgdata)
    if lock is not None:
        return _judged(lock, pgdata, host)
    if not pgdata.is_dir():
        return False, "it is not there"
    path = pgdata / LOCK_FILE
    try:
        written = path.stat()
        text = _text_of(path)
    except FileNotFoundError:
        on_it, found = _a_postgres_on(pgdata)
        return on_it, f"it has no {LOCK_FILE}, and {found}"
    except OSError as error:  # (not ours to read, or the disk failing: nothing can be told)
        return True, f"its {LOCK_FILE} cannot be read ({error.strerror}), so nothing can be told"
    if _whole(text):  # (yet not PostmasterLock.read's: its port line is no port)
        return True, (f"its {LOCK_FILE} names a port no server writes"
                      f" ({text.splitlines()[_PORT_LINE]!r}), so whether a server runs on it"
                      " cannot be told; if none does, remove the file by hand")
    return _not_whole_judged(pgdata, time.time() - written.st_mtime,
                             f"its {LOCK_FILE} is not whole ({_what_it_holds(text)})")


def _clear_if_not_whole(pgdata: Path) -> str | None:
    """clear_if_stale for a file PostmasterLock.read does not read: removed if it is not whole and
    no server holds it (the module's docstring), and the line that says so; None with no file, or
    with one whole but no server's (a port none writes: left for the server to judge)."""
    path = pgdata / LOCK_FILE
    try:
        before = path.stat()
        text = _text_of(path)
    except OSError:
        return None
    if _whole(text):
        return None
    may_run, why = _not_whole_judged(pgdata, time.time() - before.st_mtime,
                                     f"it is not whole ({_what_it_holds(text)})")
    if may_run:
        return f"left {path} in place: {why}"
    # (A server started meanwhile would have written it: only the file judged goes.)
    try:
        after = path.stat()
    except FileNotFoundError:
        return None
    if (after.st_ino, after.st_mtime_ns, after.st_size) != (
            before.st_ino, before.st_mtime_ns, before.st_size):
        return f"left {path} in place: it changed as it was read"
    path.unlink(missing_ok=True)
    return f"removed {path}, which no server holds: {why}"


def _not_whole_judged(pgdata: Path, written_ago: float, not_whole: str) -> tuple[bool, str]:
    """Whether a server may hold `pgdata`'s lock file, not whole and last written `written_ago`
    seconds ago (False only when it is certain none does: the module's docstring), and why, in
    words that follow `not_whole`, what the caller says of the file ("it is not whole (empty)")."""
    if written_ago < 0:
        return True, (f"{not_whole}, and is stamped in the future, which tells nothing of when it"
                      " was written: a server starting on that data directory may be writing it;"
                      " if none is, remove it by hand")
    if written_ago < NOT_WHOLE_FOR_SECONDS:
        return True, (f"{not_whole}, and was written {written_ago:.0f} s ago: a server starting on"
                      " that data directory may be writing it; if none is, run again after"
                      f" {NOT_WHOLE_FOR_SECONDS:.0f} s")
    on_it, found = _a_postgres_on(pgdata)
    return on_it, f"{not_whole}, was last written {written_ago:.0f} s ago, and {found}"


def _text_of(path: Path) -> str:
    """A lock file's text, bytes not UTF-8 kept as they are: PostgreSQL writes the data
    directory's path as its bytes are, which a checkout's name in Latin-1 leaves no UTF-8."""
    return path.read_bytes().decode(errors="surrogateescape")


def _whole(text: str) -> bool:
    """Whether a lock file's text holds a pid (not 0) and a port line, as a server's first write
    does."""
    lines = text.splitlines()
    try:
        return int(lines[_PID_LINE]) != 0 and len(lines) > _PORT_LINE
    except (IndexError, ValueError):
        return False


def _what_it_holds(text: str) -> str:
    """What a file not whole holds, in words."""
    if not text.strip("\0 \n"):
        return "empty" if not text else "blanks only"
    try:
        pid = int(text.splitlines()[_PID_LINE])
    except ValueError:
        return "no pid"
    return f"pid {pid} and no port" if pid else "pid 0"


def _a_postgres_on(pgdata: Path) -> tuple[bool, str]:
    """Whether a process is, or may be (it cannot be told), a postgres running on `pgdata`, and
    what was found, in words ("pid 42 is ...", "no postgres runs on that data directory"). Only
    the processes of the data directory's owner are asked: PostgreSQL refuses to run on a data
    directory its user does not own (checkDataDir), so another user's postgres (the system's
    own, say) is none of its, whatever it runs on."""
    try:
        owner = pgdata.stat().st_uid
    except OSError:  # (its file was read just now: every process is asked, should it be so)
        owner = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if owner is not None and entry.stat().st_uid != owner:
                continue
            program = (entry / "comm").read_text().rstrip("\n")
        except (FileNotFoundError, ProcessLookupError):  # (ended meanwhile)
            continue
        except OSError as error:
            return True, (f"pid {entry.name} is a process whose program cannot be read"
                          f" ({error.strerror})")
        if program != "postgres":
            continue
        on_it, what_it_is = _a_postgres_judged(int(entry.name), pgdata)
        if on_it is not False:
            return True, f"pid {entry.name} {what_it_is}"
    return False, "no postgres runs on that data directory"


def _judged(lock: PostmasterLock, pgdata: Path, host: str) -> tuple[bool, str]:
    """Whether a server may hold `lock` still (False only when it is certain none does), and why:
    what was checked and found, in words."""
    on_it, what_it_is = _postgres_on_and_what_it_is(lock.pid, pgdata)
    if on_it:
        return True, f"it {what_it_is}"
    if lock.shared_memory is not None:
        return _judged_by_segment(lock, f"pid {lock.pid} {what_it_is}")
    if on_it is None:
        return True, f"it {what_it_is}, and the file names no shared memory to tell by"
    return _judged_by_port(lock, pgdata, host, f"pid {lock.pid} {what_it_is}")


def _judged_by_segment(lock: PostmasterLock, pid_found: str) -> tuple[bool, str]:
    """_judged's answer for a file naming a segment. A server running on the data directory
    wrote the file, and is attached to the segment it names, as every process of it is: with
    none attached none runs, whatever the pid is (a postgres whose data directory cannot be told
    too) and whatever listens on the port (a later run's Redis or broker, say: devstack's ports
    are picked afresh each run)."""
    key, shmid = lock.shared_memory
    attached = processes_attached_to(lock.shared_memory)
    if attached is None:
        return True, f"{SYSV_SHARED_MEMORY} cannot be read to tell if its shared memory is in use"
    if attached:
        return True, (f"its shared memory (key {key}, id {shmid}) is in use still (attached:"
                      f" {attached}), by a killed server's backends, say")
    return False, (f"{pid_found}; no process is attached to the shared memory it names (key"
                   f" {key}, id {shmid})")


def _judged_by_port(lock: PostmasterLock, pgdata: Path, host: str,
                    pid_found: str) -> tuple[bool, str]:
    """_judged's answer for a file naming no segment, and a pid no postgres of the data
    directory: a server's that ended before it made one, whose port is what is left to tell by."""
    if not port_open(host, lock.port):
        return False, (f"{pid_found}; it names no shared memory, and nothing listens on its port"
                       f" {lock.port}")
    served, why_not = _data_directory_served_on(host, lock.port)
    if served is None:
        return True, f"something listens on its port {lock.port}{why_not}"
    if os.path.exists(served) and os.path.samefile(served, pgdata):
        return True, f"a server of that data directory answers on its port {lock.port}"
    return False, (f"{pid_found}; it names no shared memory, and the server on its port"
                   f" {lock.port} is of another data directory ({served})")


def processes_attached_to(segment: tuple[int, int]) -> int | None:
    """How many processes are attached to the System V segment (key, shmid): 0 if it is gone,
    None if that cannot be read."""
    segments = attached_by_segment()
    return None if segments is None else segments.get(segment, 0)


def remove_shared_memory_left(pgdata: Path) -> str | None:
    """Remove the System V segment a server killed on `pgdata` left (the one its postmaster.pid
    names), if nothing is attached to it, saying so; None if none was removed. A server started
    again on the data directory would remove it; one killed for good (the chaos soak's, left down
    by a Ctrl-C or a failed restart; a test's) leaves it for as long as the machine runs, once its
    folder is deleted. A segment in use (a server or its backends still running) is left."""
    lock = PostmasterLock.read(pgdata)
    if lock is None or lock.shared_memory is None:
        return None
    segments = attached_by_segment()
    if segments is None or segments.get(lock.shared_memory) != 0:
        return None  # (gone, in use, or not to be told)
    key, shmid = lock.shared_memory
    shmctl = ctypes.CDLL(None, use_errno=True).shmctl
    shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    if shmctl(shmid, _IPC_RMID, None) != 0:
        return None  # (gone meanwhile, or not ours to remove)
    return f"removed the shared memory (key {key}, id {shmid}) a server killed on {pgdata} left"


def attached_by_segment() -> dict[tuple[int, int], int] | None:
    """How many processes are attached to each System V segment, by (key, shmid); None if that
    cannot be read."""
    try:
        rows = SYSV_SHARED_MEMORY.read_text().splitlines()[1:]
    except OSError:
        return None
    segments = {}
    for row in rows:
        key, shmid, _perms, _size, _cpid, _lpid, attached, *_ = row.split()
        segments[int(key) & _KEY_BITS, int(shmid)] = int(attached)
    return segments


# Why _data_directory_served_on tells no data directory, in words that follow "something listens
# on its port 5432".
_DOES_NOT_SAY = " and does not say what it serves"
_NO_PSYCOPG2 = (", and psycopg2 is not installed here: cannot ask the server which data directory"
                " it serves")


def _data_directory_served_on(host: str, port: int) -> tuple[str | None, str]:
    """The data directory of the PostgreSQL answering `postgres` on host:port without a password,
    and "" beside it; None if none is told, and why: what listens there will not say, or
    psycopg2 is not there to ask with (`make clean` runs on a venv not yet installed too:
    devstack/clean.py)."""
    try:
        import psycopg2
    except ImportError:
        return None, _NO_PSYCOPG2

    try:
        connection = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres",
                                      connect_timeout=2)
    except psycopg2.Error:
        return None, _DOES_NOT_SAY
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW data_directory")
            return cursor.fetchone()[0], ""
    except psycopg2.Error:
        return None, _DOES_NOT_SAY
    finally:
        connection.close()
