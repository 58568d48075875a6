"""A test run stopped by SIGTERM or a hangup ends as one stopped by Ctrl-C does: pytest stops
collecting and running tests, then tears every fixture down, so the broker, the stacks and the
databases the run made go with it.

Without this, SIGTERM (a CI job's timeout, `kill`) either killed pytest outright, leaving the
servers it had started in sessions of their own running and its databases behind, or, while a
stack was up (devstack's ProcessGroup stops its processes, then raises SystemExit), failed the one
test it hit and let the run go on.
"""

from __future__ import annotations

import signal


def pytest_configure(config) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:  # (a run under nohup keeps ignoring hangups)
            signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")
