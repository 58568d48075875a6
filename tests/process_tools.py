"""Process tools for the tests: every process a test starts itself and goes on beside (a Celery
worker, a gRPC server, a command it reads from) is started by start_child, and dies with the
test session. (A command it only waits for, with subprocess.run, ends by itself.)

A session stops what it starts however it is told to end, but not when it is killed outright
(SIGKILL, a CI job's hard kill): a child started with a plain Popen outlived it, as an orphan (a
worker holding its broker's and databases' connections, a server its port, for good). So
start_child asks the kernel to kill the child as its parent ends (PR_SET_PDEATHSIG, SIGKILL: the
session is gone, nothing is left to stop it gracefully for). The kernel sends it as the *thread*
that forked the child ends, not the process: so a child is only started from the main thread,
which ends with the process (a test starting one from a thread of its own is refused, not left
to die with that thread). What the child starts in turn is its own to stop: a Celery prefork
pool's processes ask for the same (celery.concurrency.prefork), and the servers the session
starts (devstack's ManagedProcess, each leading a process group) are written down for the next
session to stop instead (tests/session_folders.py), but for those
tests/integration/test_devstack_infra.py starts to try devstack.infra, which outlive it.
served_by_gunicorn serves a WSGI app as the stack serves the APIs, one of those servers.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from devstack.infra import LOCALHOST, free_port, port_open, wait_for_process
from devstack.leftovers import started_at
from devstack.processes import ManagedProcess
from devstack.stack import REPO_ROOT, gunicorn_argv

PR_SET_PDEATHSIG = 1  # (linux/prctl.h)
# The C library's prctl, looked up here, once, so that a child between fork and exec only calls
# it (a lookup there, ctypes' dlsym and attribute cache, would run in a copy of a process whose
# other threads may have held their locks as it forked).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PRCTL.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_PRCTL.restype = ctypes.c_int


def start_child(argv, **options) -> subprocess.Popen:
    """`subprocess.Popen(argv, **options)`, for a child killed as this process ends, however it
    ends. Refused outside the main thread (see above); a `preexec_fn` given runs after."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start_child starts a child from the main thread only: the kernel's "
                           "signal comes as the thread that started it ends")
    parent, then = os.getpid(), options.pop("preexec_fn", None)

    def dying_with_the_parent() -> None:
        die_with_parent(parent)
        if then is not None:
            then()

    return subprocess.Popen(argv, preexec_fn=dying_with_the_parent, **options)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process once `parent`, its parent, ends; killed at once if it
    has already. (Let go of as the process changes user: a child that does, asks again.)"""
    if _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # (it ended before the kernel was asked: no signal comes)
        os.kill(os.getpid(), signal.SIGKILL)


def line_within(stream: IO[str], timeout: float, what: str) -> str:
    """The next line of `stream` (a child's pipe, in text) with its newline, or "" at its end
    (the child closed it), as readline gives them; but a child that never writes the line fails
    the test after `timeout` seconds, saying what it was waited for as and what of it had come,
    instead of hanging the session. It is read by a thread of its own, a character at a time (what
    came is kept as it comes). (Left reading, that thread ends once the child, killed as the test
    fails, closes the pipe.) So a stream whose line did not come in time is not to be read again:
    that thread would take what comes next."""
    if not isinstance(stream, io.TextIOBase):  # (a binary pipe's b"\n" would never end a line)
        raise TypeError(f"line_within reads a pipe opened in text, not {type(stream).__name__}")
    read: list[str] = []
    failed: list[Exception] = []
    ended = threading.Event()

    def read_the_line() -> None:
        try:
            while (character := stream.read(1)) and character != "\n":
                read.append(character)
            read.append(character)
        except Exception as error:  # (raised again in the caller's thread)
            failed.append(error)
        finally:
            ended.set()

    threading.Thread(target=read_the_line, daemon=True, name=f"reading {what}").start()
    if not ended.wait(timeout):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; read of the line "
                             f"so far: {''.join(read)!r}")
    if failed:
        raise failed[0]
    return "".join(read)


def end_child(process: subprocess.Popen) -> None:
    """What a test leaves of a child it started, ended: killed if it still runs, reaped, and its
    pipes closed (Popen's own exit). A Popen let go of with a pipe open warns as it is collected
    (ResourceWarning: unclosed file), one not reaped too."""
    if process.poll() is None:
        process.kill()
    with process:
        pass


def gone(pid: int) -> bool:
    """True once pid no longer runs (a zombie waiting for its reaper counts as gone)."""
    return started_at(pid) is None


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Ask a process to stop (SIGTERM), and kill it if it has not within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def served_by_gunicorn(name: str, app: str, run_dir: Path,
                       note_started: Callable[[ManagedProcess], None],
                       env: Mapping[str, str] | None = None, **argv_options) -> Iterator[str]:
    """The URL of a gunicorn serving the WSGI app `app` as the APIs are served (the shop's worker
    class, in a worker forked off its master: devstack.stack.gunicorn_argv, given
    `argv_options`), with `env` (this process's by default), logging to `name`.log in `run_dir`;
    stopped as the block ends."""
    port = free_port()
    argv = gunicorn_argv(port, app, **argv_options)
    server = ManagedProcess(name, [sys.executable, "-m", *argv], env, run_dir / f"{name}.log",
                            REPO_ROOT, on_start=note_started).start()
    try:
        wait_for_process(server, lambda: port_open(LOCALHOST, port), timeout=30,
                         what="gunicorn to accept connections")
        yield f"http://{LOCALHOST}:{port}"
    finally:
        server.stop()
