"""Whether this server process has been told to stop: requests that last (the gateway's
notification sockets) end themselves on it, where the server would wait for them to its graceful
timeout and then drop them without a word.

Set by the worker the servers run (shared.gunicorn_worker) as it is told to stop (SIGTERM: a
deploy, a restart, gunicorn's reload); never cleared, as the process does not start again. A
server that does not set it (Flask's own, in tests) never stops a request so."""

from __future__ import annotations

import threading

_STOPPING = threading.Event()


def stopping() -> bool:
    """Whether the process has been told to stop."""
    return _STOPPING.is_set()


def stop_requests_that_last() -> None:
    """Tell the requests that last that the process is stopping (safe in a signal handler: the
    event is set by no other thread)."""
    _STOPPING.set()
