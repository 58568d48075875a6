"""A Celery worker of the shop's app (its celeryconfig, its transport) with two tasks of a test's
besides the shop's, which note in a Redis list of the test's the order they began in: one that then
waits until the test releases it, as a handler's slow batch holds a thread, and one that only notes
it began. For a test of how a real worker takes tasks from its queues, where the shop's own tasks
would need a database and messages to take their time.

Run as Celery is: `python -m tests.worker_with_probe_tasks -A tasks worker ...`; tests send the
tasks by name, to the queue they choose."""

from __future__ import annotations

import sys

WAITS_TO_BE_RELEASED = "tests.waits_to_be_released"
NOTES_IT_BEGAN = "tests.notes_it_began"
# A task waiting to be released gives up after this long, released or not: a test that failed
# without releasing it does not leave the worker's threads held for ever.
RELEASED_WITHIN_SECONDS = 60


def main() -> None:
    import redis
    from celery.bin.celery import main as celery_main

    from shared.config import get_settings
    from tasks.celery_app import app

    client = redis.Redis.from_url(get_settings().redis_url)

    @app.task(name=WAITS_TO_BE_RELEASED, ignore_result=True)
    def waits_to_be_released(began_key: str, note: str, released_key: str) -> None:
        """Note `note` at the end of the list `began_key`, then wait for an item of `released_key`
        (one each task), taking it."""
        client.rpush(began_key, note)
        client.blpop([released_key], timeout=RELEASED_WITHIN_SECONDS)

    @app.task(name=NOTES_IT_BEGAN, ignore_result=True)
    def notes_it_began(began_key: str, note: str) -> None:
        client.rpush(began_key, note)

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
