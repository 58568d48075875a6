"""Ctrl-C ends an operator's command quietly whenever it comes, while its modules load too: it dies
of SIGINT, as Python's own KeyboardInterrupt would have it die, but with no traceback. A shell says
130 (128 + SIGINT) of it, and a script running the command stops as it would for any command Ctrl-C
ended: bash stops a loop or a script whose child died of SIGINT, not one whose child exited 130.

A command's module run as `__main__` calls `quiet_while_loading()` before its other imports (up to
half a second of them: Celery, SQLAlchemy, gRPC), and runs its `main` through `run_main`. Only the
standard library is imported here, and the packages the commands live in (shared, tasks, devstack,
bench and bench.chaos) import nothing as they load, so that nothing runs before the call but
Python's own start.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

# What `main` returns once it has said what an interrupt cut short (tasks.parked's count), for
# `run_main` to die of SIGINT as for a KeyboardInterrupt left to rise; and what a shell shows.
INTERRUPTED = 128 + signal.SIGINT

_loading = False


def quiet_while_loading() -> None:
    """Until `run_main`, Ctrl-C ends the process at once, nothing said: nothing has been done yet.
    (SIGINT's default action, the kernel's, where Python's KeyboardInterrupt would print the
    traceback of whichever import it cut short, and only once that import's C code returned.)
    SIGINT ignored, as for a command started in the background by a script, stays ignored."""
    global _loading
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _loading = True


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with what `main` returns, Ctrl-C a KeyboardInterrupt again while it runs, which a
    command may take its own way, returning INTERRUPTED once done (tasks.parked says how many
    messages went through, devstack stops what it started, a gRPC server stops serving); with one
    that `main` leaves to rise, or INTERRUPTED returned, the process dies of SIGINT, nothing more
    said."""
    global _loading
    if _loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _loading = False
    try:
        status = main()
    except KeyboardInterrupt:
        status = INTERRUPTED
    if status == INTERRUPTED:
        _die_of_sigint()
    sys.exit(status)


def flush_standard_streams() -> None:
    """Write out what sys.stdout and sys.stderr hold, for a process about to end without
    Python's own exit (a signal's default action, os._exit), which would have flushed them."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # (a closed pipe, a closed stream: nothing more to say)
            pass


def _die_of_sigint() -> NoReturn:
    """End the process as SIGINT's default action ends it (what Python does with a KeyboardInterrupt
    left to rise, after printing its traceback), what was written flushed first."""
    flush_standard_streams()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    # (Were SIGINT blocked in this thread, it would end the process only once unblocked.)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os._exit(INTERRUPTED)
