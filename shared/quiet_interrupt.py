"""Ctrl-C ends an operator's command quietly whenever it comes, while its modules load too: exit
status 130 (128 + SIGINT, what a shell says of a command Ctrl-C ended), no traceback.

A command's module run as `__main__` calls `quiet_while_loading()` before its other imports (up to
half a second of them: Celery, SQLAlchemy, gRPC), and runs its `main` through `run_main`. Only the
standard library is imported here, and the packages the commands live in (shared, tasks, devstack)
import nothing as they load, so that nothing runs before the call but Python's own start.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import NoReturn

INTERRUPTED = 128 + signal.SIGINT


def _end_unsaid(signum, frame) -> NoReturn:
    raise SystemExit(INTERRUPTED)


def quiet_while_loading() -> None:
    """Until `run_main`, Ctrl-C ends the process with INTERRUPTED and nothing said: nothing has
    been done yet. (A SystemExit from the handler, where Python's KeyboardInterrupt would print
    the traceback of whichever import it cut short.) SIGINT ignored, as for a command started in
    the background by a script, stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _end_unsaid)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with what `main` returns, Ctrl-C a KeyboardInterrupt again while it runs, which a
    command may take its own way (tasks.parked says how many messages went through, devstack
    stops what it started); one that `main` leaves to rise ends the process with INTERRUPTED,
    unsaid."""
    if signal.getsignal(signal.SIGINT) is _end_unsaid:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main()
    except KeyboardInterrupt:
        status = INTERRUPTED
    sys.exit(status)
