"""Relaying outbox rows to Kafka: a Celery task that beat sends, which stays to lead the relay.

Beat sends `relay_outbox` for each service every `outbox_relay_interval_seconds`. The first run
to take the service database's leader lock (shared/relay_leader.py) stays: it sends every row
waiting, then sleeps until a commit that inserted outbox rows notifies it, sends again, and so on
until its worker shuts down. Every later run finds the leader and returns at once, so beat only
matters when no leader is alive (its worker died, its database connection broke): the next run
takes over within one interval. A row waits for the relay only as long as its commit takes to
notify, never for a poll.

A leader that the broker refuses for long steps down (STEP_DOWN_AFTER_SECONDS), so that a worker
whose own way to the broker is broken does not hold the lead while others could relay.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import bootsteps
from celery.signals import worker_shutting_down
from flask import current_app

from shared.kafka import OutboxPublisher, ensure_topics
from shared.outbox import (count_parked_outbox_messages, refused_rows_wait, relay_pending_outbox,
                           vacuum_outbox)
from shared.relay_leader import RelayLeaderConnection
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

_PUBLISHER = "hseshop.outbox_publisher"
# The leader sends without being notified this often too: it retries rows the broker refused, and
# makes good a notification lost with a connection.
RECHECK_SECONDS = 1.0
# The leader vacuums the outbox once it has deleted this many rows since it last did
# (shared.outbox.vacuum_outbox), between one wake-up's sending and its next wait.
VACUUM_AFTER_ROWS = 1000
# How long the leader gives each of the topic check's two broker calls after a refused batch.
TOPIC_CHECK_TIMEOUT_SECONDS = 2.0

# A leader whose every batch the broker has refused for this long, while rows waited (refused rows
# waiting for their next try count: shared.outbox.FIRST_RETRY_AFTER_SECONDS), steps down: it
# closes its connection, and the lock with it, and this process takes no lead of that outbox for
# SIT_OUT_SECONDS, so that beat's next runs find a relay in another worker, whose way to the
# broker may be sound. Where the broker is down for all, the lead just moves on (or, with one
# worker, comes back after the sit-out).
STEP_DOWN_AFTER_SECONDS = 60.0
SIT_OUT_SECONDS = 10.0
# While rows are parked (shared.outbox), the leader says so this often, and as it starts to lead:
# the later rows of their keys wait behind them, and a one-off log line is easily missed.
PARKED_REMINDER_SECONDS = 300.0

_stopping = threading.Event()
_leading: set[str] = set()  # services whose relay this process leads
_sitting_out: dict[str, float] = {}  # service -> until when (time.monotonic) this process does not
_leading_lock = threading.Lock()


@worker_shutting_down.connect
def _stop_leading(**kwargs) -> None:
    _stopping.set()


class StopLeadingStep(bootsteps.StartStopStep):
    """Ends this worker's relays as the worker stops, however it was told to: the shutdown signal
    above comes only with SIGTERM, SIGINT or SIGQUIT, not with `celery control shutdown`, a SIGHUP
    restart or an unrecoverable error, and the pool, stopping after this step, waits for its
    threads, one of which leads until told to stop."""

    requires = {"celery.worker.components:Pool"}

    def stop(self, worker) -> None:
        _stop_leading()

    def terminate(self, worker) -> None:  # a cold shutdown, as when the worker gives up on Redis
        _stop_leading()


def _publisher() -> OutboxPublisher:
    extensions = current_app.extensions
    if _PUBLISHER not in extensions:
        extensions[_PUBLISHER] = OutboxPublisher(extensions["hseshop.settings"])
    return extensions[_PUBLISHER]


@app.task(name="hseshop.relay_outbox", base=ServiceTask, ignore_result=True)
def relay_outbox(service: str) -> int:
    """Lead this service's relay until the worker stops, unless a relay already leads it; returns
    the number of rows sent."""
    with _leading_lock:
        if (service in _leading or _stopping.is_set()
                or time.monotonic() < _sitting_out.get(service, 0.0)):
            return 0
        _leading.add(service)
    try:
        settings = current_app.extensions["hseshop.settings"]
        with RelayLeaderConnection(settings.database_url(service)) as leader:
            if not leader.lead():
                return 0
            log.info("leading the %s outbox relay", service)
            return _lead(service, settings, leader)
    finally:
        with _leading_lock:
            _leading.discard(service)


def _lead(service: str, settings, leader: RelayLeaderConnection) -> int:
    publisher = _publisher()
    sent = deleted_since_vacuum = 0
    refused_since = None  # when the broker began refusing every batch, if it does
    next_reminder = 0.0  # of parked rows: at once
    while not _stopping.is_set():
        started = time.monotonic()
        if started >= next_reminder:
            _remind_of_parked_rows(service, leader)
            next_reminder = started + PARKED_REMINDER_SECONDS
        just_sent, refused = _send_waiting_rows(service, settings, leader, publisher)
        sent += just_sent
        deleted_since_vacuum += just_sent
        if just_sent:
            refused_since = None
        elif refused:
            refused_since = started if refused_since is None else refused_since
        elif refused_since is not None and not _refused_rows_wait(leader):
            refused_since = None  # nothing refused is left to send
        if (refused_since is not None
                and time.monotonic() - refused_since >= STEP_DOWN_AFTER_SECONDS):
            _step_down(service, time.monotonic() - refused_since)
            return sent
        if deleted_since_vacuum >= VACUUM_AFTER_ROWS:
            with leader.cursor() as cursor:
                vacuum_outbox(cursor)
            deleted_since_vacuum = 0
        leader.wait(RECHECK_SECONDS)
    log.info("%s outbox relay stopping with its worker", service)
    return sent


def _remind_of_parked_rows(service: str, leader: RelayLeaderConnection) -> None:
    with leader.cursor() as cursor:
        parked = count_parked_outbox_messages(cursor)
    if parked:
        log.error("%s outbox: %d message(s) parked, the later rows of their keys waiting behind"
                  " them (python -m tasks.parked list %s --outbox)", service, parked, service)


def _refused_rows_wait(leader: RelayLeaderConnection) -> bool:
    with leader.cursor() as cursor:
        return refused_rows_wait(cursor)


def _step_down(service: str, refused_for: float) -> None:
    log.warning("%s outbox: the broker has refused every batch for %.0f s; stepping down so that"
                " a relay in another worker can lead", service, refused_for)
    with _leading_lock:
        _sitting_out[service] = time.monotonic() + SIT_OUT_SECONDS


def _send_waiting_rows(service: str, settings, leader: RelayLeaderConnection,
                       publisher: OutboxPublisher) -> tuple[int, bool]:
    """Send batch after batch until none is left or the broker takes none of a batch; returns how
    many rows were sent and whether the broker refused a batch whole. The rows it refused wait
    for their next try (shared.outbox), and the next read passes over them, so a batch it took in
    part is followed by the next; the refusals are logged, and the topics checked, once a call.
    (Messages too large ever to be sent say nothing about the broker: they are parked, and the
    next read passes over them too.)"""
    sent = refused = 0
    refused_whole = False
    while not _stopping.is_set():
        with leader.cursor() as cursor:
            result = relay_pending_outbox(cursor, publisher.send_batch,
                                          settings.outbox_relay_batch_size)
        sent += result.sent
        if result.parked:
            log.error("%s outbox: parked %d message(s) too large to be sent; the later rows of"
                      " their keys wait behind them (python -m tasks.parked list %s --outbox)",
                      service, result.parked, service)
        if result.refused_by_the_broker:
            if not refused:
                _recreate_topics(settings, service)
            refused += result.refused_by_the_broker
            if not result.sent:
                refused_whole = True
                break
        if result.claimed < settings.outbox_relay_batch_size:
            break
    if refused:
        log.warning("%s outbox: %d rows not acknowledged by the broker; each is tried again"
                    " after its wait", service, refused)
    return sent, refused_whole


def _recreate_topics(settings, service: str) -> None:
    # A broker that lost its topics (a fresh in-memory one, say) refuses every message until they
    # are back; creating them again costs nothing when they exist.
    try:
        ensure_topics(settings, settings.topics(), timeout=TOPIC_CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # broker still down: the next run tries again
        log.info("%s outbox: cannot reach the broker to check topics: %s", service, exc)
