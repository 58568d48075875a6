"""A Celery worker of the shop's app (its celeryconfig, its transport) with two tasks of a test's
besides the shop's: one that takes a while, as a handler's batch may, and one that notes the moment
it began, in a file. For a test of how a real worker takes tasks from its queues, where the shop's
own tasks would need a database and messages to take their time.

Run as Celery is: `python -m tests.worker_with_probe_tasks -A tasks worker ...`; tests send the
tasks by name, to the queue they choose."""

from __future__ import annotations

import sys
import time
from pathlib import Path

TAKES_A_WHILE = "tests.takes_a_while"
NOTES_IT_BEGAN = "tests.notes_it_began"


def main() -> None:
    from celery.bin.celery import main as celery_main

    from tasks.celery_app import app

    @app.task(name=TAKES_A_WHILE, ignore_result=True)
    def takes_a_while(seconds: float) -> None:
        time.sleep(seconds)

    @app.task(name=NOTES_IT_BEGAN, ignore_result=True)
    def notes_it_began(path: str) -> None:
        Path(path).write_text(repr(time.time()))

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
