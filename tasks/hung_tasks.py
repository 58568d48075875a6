"""A worker's watch over its inbox handler tasks: one that has made no progress for longer than a
sound one can wait on one thing (HUNG_AFTER_SECONDS) is hung, and the worker ends at once, hard, to
be started again.

A worker runs its tasks on a pool of threads (`-P threads`), which Celery cannot time out: a handler
that hangs in Python outside a SQL statement (an endless loop, a deadlock) keeps its thread for
good. PostgreSQL ends its transaction (idle_in_transaction_session_timeout), but not the thread;
the sweeper hands the message to a task of its own, which hangs another, and so on until every
thread is held and the worker handles nothing, its alive file renewed all along by the consumer's
event loop. So the tasks that run handlers (marked `watched_for_hangs`) are noted as they begin
and end (Celery's task_prerun and task_postrun, in the task's own thread), and a thread of the
worker's looks at them every CHECK_EVERY_SECONDS.

What it judges is progress, not age: the limits that bound a sound task (shared.db's
SESSION_LIMITS, the connection and publish timeouts) bound each wait, not a task's whole run, and a
batch of 50 messages whose account rows are contended waits up to 2 s for each of many locks,
minutes in all, as does any task on a database slowed down. So the task's thread marks its
progress (shared.progress) as each statement on a pooled connection begins and ends (shared.db's
ProgressMarkingCursor) and as each task it sends is published (Celery's before/after_task_publish),
and a task is hung once it has gone HUNG_AFTER_SECONDS without a mark since it began. A handler
stuck in Python runs no statement, and is so found however busy the other threads are.

One hung is said in a CRITICAL line, naming the task and its messages, and the process ends with
os._exit(HUNG_TASK_EXIT_CODE): no warm shutdown, which would wait for the hung thread for ever.
Meanwhile (between the bound and the check) the alive file is not renewed (tasks/alive.py), so the
healthcheck agrees.

Ending so loses nothing: tasks are acknowledged as they are taken (celeryconfig.py: no acks_late),
a transaction in flight rolls back as its connection drops, and the sweeper hands the messages
over again, each to a task of its own once the queue is empty; such a try was noted as begun
(shared.inbox.handling.note_try_begun) and never ended, so the sweeper counts it as an attempt,
and parks the message after INBOX_MAX_ATTEMPTS of them (shared.inbox.sweeping). Its supervisor
starts the worker again: compose's `restart: unless-stopped`, `make run`'s supervision
(devstack/supervision.py).

The relay (tasks/relay.py) is not watched: its task leads until the worker stops, by design, and
bounds each of its waits itself. Nor are the sweeper and the pruners, which run no handler.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery import bootsteps
from celery.signals import after_task_publish, before_task_publish, task_postrun, task_prerun
from click import FloatRange, Option

from shared.db import (CONNECTION_TIMEOUTS, IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, POOL_WAIT_SECONDS,
                       STATEMENT_TIMEOUT_SECONDS)
from shared.progress import last_progress, mark_progress

log = logging.getLogger(__name__)

# How long a handler task may go without progress (shared.progress: a statement begun or ended, a
# task published) before it counts as hung. A sound one marks progress every few milliseconds; its
# longest gap between two marks is the longest single wait it may be held up in, each bounded
# (not their sum: a task runs as many as it has statements, and a batch of 50 contended messages
# takes minutes in all, its marks steady): a statement runs STATEMENT_TIMEOUT_SECONDS (30) at most,
# its lock waits within it, and one on a connection gone silent ends with TCP's 30 s
# (CONNECTION_TIMEOUTS); a transaction left idle between statements is ended by PostgreSQL after
# IDLE_IN_TRANSACTION_TIMEOUT_SECONDS (60), after which nothing of the task's can come to anything
# (shared.db's SESSION_LIMITS); a connection is waited for in the pool POOL_WAIT_SECONDS (2) at
# most, then connected within connect_timeout (10 s), before the pool's ping (a statement); a
# publish to Redis fails within 10 s (tasks/redis_transport.py). A task quiet past the longest of
# them, and a margin of 30 s for the Python between (the GIL shared with the pool's other threads),
# is stuck outside them.
PUBLISH_GIVES_UP_SECONDS = 10
LONGEST_SOUND_WAIT_SECONDS = max(STATEMENT_TIMEOUT_SECONDS, IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
                                 POOL_WAIT_SECONDS + CONNECTION_TIMEOUTS["connect_timeout"],
                                 PUBLISH_GIVES_UP_SECONDS)
HUNG_AFTER_MARGIN_SECONDS = 30
HUNG_AFTER_SECONDS = LONGEST_SOUND_WAIT_SECONDS + HUNG_AFTER_MARGIN_SECONDS
# How often the watch looks: a hung task is found within this of the bound.
CHECK_EVERY_SECONDS = 1.0
# The exit code of a worker that ended for a hung task (EX_TEMPFAIL: started again, it goes on),
# apart from the 70 of one whose inbox consumer ended (tasks/consumer.py).
HUNG_TASK_EXIT_CODE = os.EX_TEMPFAIL


@dataclass(frozen=True)
class RunningTask:
    task_id: str
    thread: int  # the id of the thread that runs it (threading.get_ident())
    name: str
    described: str  # its arguments, as the log says them
    began: float  # time.monotonic()


class HungTaskWatch:
    """The watched tasks this process runs now, each with its thread and when it began, and the
    bound past which one that has made no progress is hung.

    A task is keyed by its id and its thread: a task retried (Celery's self.retry) keeps its id,
    and its retry may begin on another thread before the try it replaces has ended on its own
    (task_postrun comes after the retry is sent); ending that try ends its entry, not the retry's.
    """

    def __init__(self, hung_after: float = HUNG_AFTER_SECONDS,
                 progress_of: Callable[[int], float | None] = last_progress):
        self.hung_after = hung_after
        self._progress_of = progress_of
        self._running: dict[tuple[str, int], RunningTask] = {}
        self._lock = threading.Lock()

    def begun(self, task_id: str, name: str, described: str, now: float,
              thread: int | None = None) -> None:
        thread = threading.get_ident() if thread is None else thread
        with self._lock:
            self._running[task_id, thread] = RunningTask(task_id, thread, name, described, now)

    def ended(self, task_id: str, thread: int | None = None) -> None:
        thread = threading.get_ident() if thread is None else thread
        with self._lock:
            self._running.pop((task_id, thread), None)

    def quiet_since(self, task: RunningTask) -> float:
        """When `task` last made progress: its thread's last mark, or its start if later."""
        marked = self._progress_of(task.thread)
        return task.began if marked is None else max(task.began, marked)

    def hung(self, now: float) -> RunningTask | None:
        """The task quiet longest, if it has made no progress for longer than the bound; else
        None."""
        with self._lock:
            running = list(self._running.values())
        quietest = min(running, key=self.quiet_since, default=None)
        if quietest is None or now - self.quiet_since(quietest) <= self.hung_after:
            return None
        return quietest

    def any_progressing(self, now: float) -> bool:
        """Whether a task runs that has made progress within the bound (one a warm shutdown
        waits for rightly)."""
        with self._lock:
            running = list(self._running.values())
        return any(now - self.quiet_since(task) <= self.hung_after for task in running)


# This process's watch (a worker's: the signals below note tasks in any process, which only a
# worker's step looks at).
WATCH = HungTaskWatch()


def a_task_hung() -> bool:
    """Whether a watched task of this process has gone without progress past the bound (for the
    alive file)."""
    return WATCH.hung(time.monotonic()) is not None


@task_prerun.connect
def _note_begun(task_id=None, task=None, args=(), kwargs=None, **ignored) -> None:
    if getattr(task, "watched_for_hangs", False):
        WATCH.begun(task_id, task.name, described_arguments(args), time.monotonic())


@task_postrun.connect
def _note_ended(task_id=None, **ignored) -> None:
    WATCH.ended(task_id)


# A task's publish (a batch handing a failed message to a task of its own) waits on Redis, within
# PUBLISH_GIVES_UP_SECONDS: progress either side of it, as a statement's.
@before_task_publish.connect
def _publishing(**ignored) -> None:
    mark_progress()


@after_task_publish.connect
def _published(**ignored) -> None:
    mark_progress()


def described_arguments(args) -> str:
    """A handler task's arguments as a line says them: its service, and its message id or ids."""
    service, *rest = args or ("?",)
    ids = rest[0] if rest else []
    ids = [ids] if isinstance(ids, str) else list(ids)
    return f"{service} message(s) {', '.join(ids)}"


def hung_task_seconds_option() -> Option:
    return Option(["--hung-task-seconds"], type=FloatRange(min=1.0), default=HUNG_AFTER_SECONDS,
                  help="End the worker (exit code 75) once an inbox handler task has made no "
                       f"progress this long (default {HUNG_AFTER_SECONDS} s), to be started "
                       "again.")


class HungTaskWatchStep(bootsteps.StartStopStep):
    """A worker step: the thread that watches the handler tasks, from the worker's start to the
    process's end (a warm shutdown waits for the running tasks: a hung one would hold it for
    ever, so the watch goes on through it)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, hung_task_seconds=HUNG_AFTER_SECONDS, **options):
        super().__init__(worker, **options)
        WATCH.hung_after = float(hung_task_seconds)

    def start(self, worker) -> None:
        threading.Thread(target=watch_for_ever, args=(WATCH,), name="hung-task-watch",
                         daemon=True).start()


def watch_for_ever(watch: HungTaskWatch) -> None:
    while True:
        time.sleep(min(CHECK_EVERY_SECONDS, watch.hung_after / 4))
        hung = watch.hung(time.monotonic())
        if hung is not None:
            now = time.monotonic()
            log.critical("%s[%s] (%s) has made no progress for %.0f s (running %.0f s), past the"
                         " %.0f s a handler task may: hung; ending the worker (exit code %d), for"
                         " its supervisor to start it again and the sweeper to hand its messages"
                         " over", hung.name, hung.task_id, hung.described,
                         now - watch.quiet_since(hung), now - hung.began, watch.hung_after,
                         HUNG_TASK_EXIT_CODE)
            end_hard(HUNG_TASK_EXIT_CODE)


def end_hard(exit_code: int) -> None:
    """End the process at once with `exit_code`, whatever its threads do (no atexit, no join of
    the pool's threads), its log lines written out first."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # (a stream closed, or Celery's proxy of one)
            pass
    os._exit(exit_code)
