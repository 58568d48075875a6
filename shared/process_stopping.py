"""Whether this server process has been told to stop: requests that last (the gateway's
notification sockets) end themselves on it, where the server would wait for them to its graceful
timeout and then drop them without a word.

Set by the worker the servers run (shared.gunicorn_worker) as it stops taking requests: told to
stop (SIGTERM: a deploy, a restart; SIGINT or SIGQUIT: a quick shutdown), or ending by itself
(max_requests served, its parent gone, gunicorn's --reload seeing a file changed); never cleared,
as the process does not start again. A server that does not set it (Flask's own, in tests) never
stops a request so.

A plain bool, not a threading.Event: nothing waits on it (the stream loop reads it at each turn),
and it is set in a signal handler, where an Event's set() could deadlock: it takes a lock that is
not reentrant, and a second SIGTERM arriving inside the first set() would wait on it for good."""

from __future__ import annotations

_stopping = False


def stopping() -> bool:
    """Whether the process has been told to stop."""
    return _stopping


def stop_requests_that_last() -> None:
    """Tell the requests that last that the process is stopping (safe in a signal handler: a
    plain assignment, taking no lock)."""
    global _stopping
    _stopping = True
