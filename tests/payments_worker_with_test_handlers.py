"""A payments Celery worker whose payment requests' handler does, before the shop's own, what a test
asks of a message: for a real worker's tries, where a test cannot monkeypatch the handler.

The test names a message's part by a file in the directory HSESHOP_TEST_HANDLERS_DIR gives, named
after the message id and the part:
- `<id>.fails-once`: the message's first try fails (its batch then runs again one by one);
- `<id>.waits`: the first time the message is handled alone (in its batch's second run, a
  savepoint each), the handler says so by a file `<id>.waiting`, and waits for `<id>.go` before
  going on (the test meanwhile cuts the database off, say);
- `<id>.ends-its-session-once`: the first time the message is handled alone, its handler ends its
  own database session, once (a backend killed, the database there again at once);
- `<id>.ends-its-session`: every try of the message ends its own database session, as a handler
  that crashes its backend, or hangs until PostgreSQL ends it, would;
- `<id>.hangs`: every try of the message says so by a file `<id>.hanging`, then hangs in Python,
  outside any SQL statement (an endless loop), for HANGS_AT_MOST_SECONDS: until the worker's
  watch over hung tasks ends the process;
- `<id>.slow`: every try of the message runs SQL statements of half a second each (pg_sleep), one
  after another, SQLAlchemy's and a driver cursor's in turn, for as many seconds as the file says:
  a task held up long, statement after statement, as by contended locks or a database slowed down.

Run as Celery is: `python -m tests.payments_worker_with_test_handlers -A tasks worker ...`."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

import payments_app
from shared.contracts import PAYMENT_REQUESTED
from shared.db import driver_cursor

# How long a handler waits for the test's word before it goes on regardless.
WAITS_AT_MOST_SECONDS = 60.0
# How long a handler told to hang does (a worker left by a failed test does not hang for ever).
HANGS_AT_MOST_SECONDS = 300.0


def _with_the_tests_parts(take_payments, directory: Path):
    done: set[str] = set()  # (message id, part) played once already
    done_lock = threading.Lock()

    def first_time(message_id: str, part: str) -> bool:
        if not (directory / f"{message_id}.{part}").exists():
            return False
        with done_lock:
            first = (message_id, part) not in done
            done.add((message_id, part))
        return first

    def handler(session, events):
        for event in events:
            message_id = str(event.message.message_id)
            if (directory / f"{message_id}.hangs").exists():
                (directory / f"{message_id}.hanging").touch()
                deadline = time.monotonic() + HANGS_AT_MOST_SECONDS
                while time.monotonic() < deadline:
                    time.sleep(0.05)
            slow = directory / f"{message_id}.slow"
            if slow.exists():
                _slow_statements(session, float(slow.read_text()))
            if (directory / f"{message_id}.ends-its-session").exists():
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            if len(events) == 1 and first_time(message_id, "ends-its-session-once"):
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            if first_time(message_id, "fails-once"):
                raise RuntimeError(f"{message_id} fails its first try, as the test asked")
            if len(events) == 1 and first_time(message_id, "waits"):
                (directory / f"{message_id}.waiting").touch()
                deadline = time.monotonic() + WAITS_AT_MOST_SECONDS
                while not (directory / f"{message_id}.go").exists():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        take_payments(session, events)

    return handler


def _slow_statements(session, seconds: float) -> None:
    """Statements of 0.5 s each, for `seconds`: SQLAlchemy's and a driver cursor's in turn."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session.execute(text("SELECT pg_sleep(0.5)"))
        with driver_cursor(session) as cursor:
            cursor.execute("SELECT pg_sleep(0.5)")


def main() -> None:
    directory = Path(os.environ["HSESHOP_TEST_HANDLERS_DIR"])
    handlers = dict(payments_app.message_handlers())
    handlers[PAYMENT_REQUESTED] = _with_the_tests_parts(handlers[PAYMENT_REQUESTED], directory)
    payments_app.message_handlers = lambda: handlers

    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
