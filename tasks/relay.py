"""Relaying outbox rows to Kafka: the task, run by beat as a safety net and kicked after commits."""

from __future__ import annotations

import logging

from flask import current_app

from shared.db import transaction
from shared.kafka import OutboxPublisher, ensure_topics
from shared.outbox import relay_pending_outbox
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

_PUBLISHER = "hseshop.outbox_publisher"
# One run drains at most this many batches, so a long backlog does not hold a worker forever.
MAX_BATCHES_PER_RUN = 50


def _publisher() -> OutboxPublisher:
    extensions = current_app.extensions
    if _PUBLISHER not in extensions:
        extensions[_PUBLISHER] = OutboxPublisher(extensions["hseshop.settings"])
    return extensions[_PUBLISHER]


@app.task(name="hseshop.relay_outbox", base=ServiceTask, ignore_result=True, acks_late=False)
def relay_outbox(service: str) -> int:
    """Send this service's unsent outbox rows, batch after batch, until none are left."""
    settings = current_app.extensions["hseshop.settings"]
    publisher = _publisher()
    sent = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction() as session:
            result = relay_pending_outbox(session, publisher.send_batch, settings.outbox_relay_batch_size)
        sent += result.sent
        if result.failed:
            log.warning("%s outbox: %d rows not acknowledged; will retry", service, result.failed)
            _recreate_topics(settings, service)
            break
        if result.skipped_busy or result.claimed < settings.outbox_relay_batch_size:
            break
    return sent


def _recreate_topics(settings, service: str) -> None:
    # A broker that lost its topics (a fresh in-memory one, say) refuses every message until they
    # are back; creating them again costs nothing when they exist.
    try:
        ensure_topics(settings, settings.topics(), timeout=2.0)
    except Exception as exc:  # broker still down: the next run tries again
        log.info("%s outbox: cannot reach the broker to check topics: %s", service, exc)


def kick_relay(service: str) -> None:
    """Ask for a relay run now, right after a commit; never fails the caller (beat is the backup)."""
    try:
        relay_outbox.apply_async((service,), expires=30, retry=False)
    except Exception:
        log.warning("could not kick the %s outbox relay; beat will pick the rows up", service,
                    exc_info=True)
