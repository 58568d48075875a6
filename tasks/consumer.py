"""The Kafka inbox consumer as a Celery worker step: a worker started with `--consume orders` runs
the orders consumer in a thread beside its task pool, and stops it when the worker stops.

A worker whose consumer thread ends on its own (its app could not be made, its Kafka client could
not subscribe or close, or rewind a partition: shared.inbox_consumer.CannotRewind) would go on
running tasks while its service's messages pile up unread, and its healthcheck, the age of a file
the worker's event loop renews (tasks/alive.py), would not tell. So it stops instead, with exit
code 70 (EX_SOFTWARE), for its supervisor (compose's `restart: unless-stopped`) to start it
again: a warm shutdown, which waits for the tasks running; should it not end within
WARM_STOP_GRACE_SECONDS (a task hung on its thread holds it for ever), the process ends hard, with
the same code, once no inbox handler task that makes progress is left running (a sound one may
run for minutes: tasks/hung_tasks.py)."""

from __future__ import annotations

import logging
import threading
import time
from os import EX_SOFTWARE

from celery import bootsteps
from celery.worker import state as worker_state

from shared.config import get_settings
from shared.db import driver_dsn
from shared.inbox_consumer import InboxConsumer, StoreOnOwnConnection
from shared.kafka import build_consumer, ensure_topics
from tasks import hung_tasks
from tasks.hung_tasks import CHECK_EVERY_SECONDS, HUNG_AFTER_SECONDS, end_hard
from tasks.services import service_app, service_package

log = logging.getLogger(__name__)


class InboxConsumerStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, consume=(), **options):
        super().__init__(worker, **options)
        self.services = list(consume or ())
        self.consumers: list[InboxConsumer] = []
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()

    def start(self, worker):
        for service in self.services:
            consumer, store = build_inbox_consumer(service)
            thread = threading.Thread(target=self._consume, args=(service, consumer, store),
                                      name=f"inbox-consumer-{service}", daemon=True)
            thread.start()
            self.consumers.append(consumer)
            self.threads.append(thread)
            log.info("started the %s inbox consumer", service)

    def stop(self, worker):
        self.stopping.set()
        for consumer in self.consumers:
            consumer.stop()
        for thread in self.threads:
            thread.join(timeout=15)

    def terminate(self, worker):  # a cold shutdown: the process exits without waiting for them
        self.stopping.set()
        for consumer in self.consumers:
            consumer.stop()

    def _consume(self, service: str, consumer: InboxConsumer, store: StoreOnOwnConnection) -> None:
        try:
            _run_in_app_context(service, consumer, store)
        except BaseException:
            log.exception("the %s inbox consumer failed", service)
        finally:
            if not self.stopping.is_set():
                log.critical("the %s inbox consumer ended while the worker runs: stopping the "
                             "worker, to be started again", service)
                stop_the_worker(EX_SOFTWARE)


# How long a warm shutdown asked here may take before the process ends hard: no task wait of a
# sound one lasts longer (tasks/hung_tasks.py: a task quiet past it is hung), the relay's neither.
# A handler task's whole run has no bound (a batch of contended messages waits seconds for each of
# its locks), so past the grace the process ends only once no handler task makes progress: one
# hung then ends it through the watch (exit code 75), the others having ended. (Ending hard loses
# nothing the sweeper does not make good: tasks are acknowledged as taken, a transaction in flight
# rolls back.)
WARM_STOP_GRACE_SECONDS = HUNG_AFTER_SECONDS


def stop_the_worker(exit_code: int,
                    grace_seconds: float = WARM_STOP_GRACE_SECONDS) -> threading.Timer:
    """Ask the worker for a warm shutdown ending with `exit_code`, from any thread: the flag a
    SIGTERM sets, which the worker's main loop checks at every turn; and end the process hard with
    that code should it still run `grace_seconds` on, once no handler task makes progress (the
    pool's stop waits for its threads, and a hung one never ends). Returns the timer that will
    (for a test to cancel)."""
    worker_state.should_stop = exit_code
    timer = threading.Timer(grace_seconds, _end_hard_after_grace, args=(exit_code, grace_seconds))
    timer.daemon = True  # (a shutdown that ends ends the process, the timer with it)
    timer.name = "warm-stop-grace"
    timer.start()
    return timer


def _end_hard_after_grace(exit_code: int, grace_seconds: float) -> None:
    while hung_tasks.WATCH.any_progressing(time.monotonic()):
        time.sleep(CHECK_EVERY_SECONDS)
    log.critical("the worker's warm shutdown has not ended within %g s, and no handler task makes"
                 " progress (a task hung?): ending the process (exit code %d)", grace_seconds,
                 exit_code)
    end_hard(exit_code)


def build_inbox_consumer(service: str) -> tuple[InboxConsumer, StoreOnOwnConnection]:
    from tasks.inbox import dispatch_inbox_messages

    settings = get_settings()
    topics = service_package(service).subscribed_topics(settings)
    try:
        ensure_topics(settings, topics)
    except Exception as exc:  # the consumer subscribes anyway and picks the topics up later
        log.warning("could not check the %s topics: %s", service, exc)
    store = StoreOnOwnConnection(driver_dsn(settings.database_url(service)))

    def on_commit(error, partitions):  # (called from the consumer's poll: once it is made)
        consumer.note_commit_result(error, partitions)

    consumer = InboxConsumer(
        build_consumer(settings, settings.consumer_group(service), on_commit=on_commit),
        topics,
        store_batch=store,
        dispatch=lambda message_ids: dispatch_inbox_messages(service, message_ids),
        name=f"the {service} inbox consumer",
    )
    return consumer, store


def _run_in_app_context(service: str, consumer: InboxConsumer,
                        store: StoreOnOwnConnection) -> None:
    try:
        with service_app(service).app_context():
            consumer.run()
    finally:
        store.close()
