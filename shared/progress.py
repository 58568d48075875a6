"""Progress marks: when each thread last began or ended a wait that is bounded elsewhere (a
database statement, a Redis publish), for a watch in another thread to tell a task held up by
such waits, one after another, from one stuck between them (tasks/hung_tasks.py).

Marked on the hot path (every statement on a pooled connection: shared.db's ProgressMarkingCursor),
so a mark is one dict write keyed by the thread's id, atomic under the GIL, and read without a
lock."""

from __future__ import annotations

from threading import get_ident
from time import monotonic

# The thread's id -> when it last marked progress (time.monotonic()). As many entries as threads
# that ever marked; an id a thread gone left behind is the next thread's of that id.
_LAST_MARK: dict[int, float] = {}


def mark_progress() -> None:
    """Note that the calling thread makes progress now."""
    _LAST_MARK[get_ident()] = monotonic()


def last_progress(thread_id: int) -> float | None:
    """When the thread last marked progress (time.monotonic()), or None if it never did."""
    return _LAST_MARK.get(thread_id)
