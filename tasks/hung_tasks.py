"""A worker's watch over its inbox handler tasks: one that has run longer than any sound one can
(HUNG_AFTER_SECONDS) is hung, and the worker ends at once, hard, to be started again.

A worker runs its tasks on a pool of threads (`-P threads`), which Celery cannot time out: a handler
that hangs in Python outside a SQL statement (an endless loop, a deadlock) keeps its thread for
good. PostgreSQL ends its transaction (idle_in_transaction_session_timeout), but not the thread;
the sweeper hands the message to a task of its own, which hangs another, and so on until every
thread is held and the worker handles nothing, its alive file renewed all along by the consumer's
event loop. So the tasks that run handlers (marked `watched_for_hangs`) are noted as they begin
and end (Celery's task_prerun and task_postrun), a thread of the worker's looks at them every
CHECK_EVERY_SECONDS, and one past the bound is said in a CRITICAL line, naming the task and its
messages, and the process ends with os._exit(HUNG_TASK_EXIT_CODE): no warm shutdown, which would
wait for the hung thread for ever. Meanwhile (between the bound and the check) the alive file is
not renewed (tasks/alive.py), so the healthcheck agrees.

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
from dataclasses import dataclass

from celery import bootsteps
from celery.signals import task_postrun, task_prerun
from click import FloatRange, Option

from shared.db import IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, STATEMENT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

# How long a handler task may run before it counts as hung. A sound one takes well under a second
# (a batch of 50 messages, one transaction). What may hold it up longer is the database, and that
# boundedly: a statement runs STATEMENT_TIMEOUT_SECONDS (30) at most, and a transaction left idle
# between statements IDLE_IN_TRANSACTION_TIMEOUT_SECONDS (60) at most, before PostgreSQL ends it
# (shared.db's SESSION_LIMITS); connecting gives up within 10 s, a publish to Redis within 10 s. A
# task running past both, and a margin of 30 s for the rest, is stuck outside the database, its
# transaction (if any) already ended by the server: no work of it can still come to anything.
HUNG_AFTER_MARGIN_SECONDS = 30
HUNG_AFTER_SECONDS = (STATEMENT_TIMEOUT_SECONDS + IDLE_IN_TRANSACTION_TIMEOUT_SECONDS
                      + HUNG_AFTER_MARGIN_SECONDS)
# How often the watch looks: a hung task is found within this of the bound.
CHECK_EVERY_SECONDS = 1.0
# The exit code of a worker that ended for a hung task (EX_TEMPFAIL: started again, it goes on),
# apart from the 70 of one whose inbox consumer ended (tasks/consumer.py).
HUNG_TASK_EXIT_CODE = os.EX_TEMPFAIL


@dataclass(frozen=True)
class RunningTask:
    task_id: str
    name: str
    described: str  # its arguments, as the log says them
    began: float  # time.monotonic()


class HungTaskWatch:
    """The watched tasks this process runs now, with when each began, and the bound past which
    one is hung."""

    def __init__(self, hung_after: float = HUNG_AFTER_SECONDS):
        self.hung_after = hung_after
        self._running: dict[str, RunningTask] = {}
        self._lock = threading.Lock()

    def begun(self, task_id: str, name: str, described: str, now: float) -> None:
        with self._lock:
            self._running[task_id] = RunningTask(task_id, name, described, now)

    def ended(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def hung(self, now: float) -> RunningTask | None:
        """The task that has run longest, if it has run longer than the bound; else None."""
        with self._lock:
            longest = min(self._running.values(), key=lambda task: task.began, default=None)
        if longest is None or now - longest.began <= self.hung_after:
            return None
        return longest


# This process's watch (a worker's: the signals below note tasks in any process, which only a
# worker's step looks at).
WATCH = HungTaskWatch()


def a_task_hung() -> bool:
    """Whether a watched task of this process has run past the bound (for the alive file)."""
    return WATCH.hung(time.monotonic()) is not None


@task_prerun.connect
def _note_begun(task_id=None, task=None, args=(), kwargs=None, **ignored) -> None:
    if getattr(task, "watched_for_hangs", False):
        WATCH.begun(task_id, task.name, described_arguments(args), time.monotonic())


@task_postrun.connect
def _note_ended(task_id=None, **ignored) -> None:
    WATCH.ended(task_id)


def described_arguments(args) -> str:
    """A handler task's arguments as a line says them: its service, and its message id or ids."""
    service, *rest = args or ("?",)
    ids = rest[0] if rest else []
    ids = [ids] if isinstance(ids, str) else list(ids)
    return f"{service} message(s) {', '.join(ids)}"


def hung_task_seconds_option() -> Option:
    return Option(["--hung-task-seconds"], type=FloatRange(min=1.0), default=HUNG_AFTER_SECONDS,
                  help="End the worker (exit code 75) once an inbox handler task has run this "
                       f"long (default {HUNG_AFTER_SECONDS} s), to be started again.")


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
            log.critical("%s[%s] (%s) has run %.0f s, past the %.0f s a handler task may: hung;"
                         " ending the worker (exit code %d), for its supervisor to start it again"
                         " and the sweeper to hand its messages over", hung.name, hung.task_id,
                         hung.described, time.monotonic() - hung.began, watch.hung_after,
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
