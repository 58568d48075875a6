"""Relaying outbox rows to Kafka: the task, kicked after commits and run by beat as a safety net.

Kicks are coalesced: a commit sends a relay task only when none is already on its way (a flag in
Redis, cleared by the run as it starts), so a busy API sends a handful of tasks a second, not one
per order. A run drains until nothing is left, so rows committed while it sends are not left to
beat.
"""

from __future__ import annotations

import logging
import time

import redis
from flask import current_app

from shared.db import transaction
from shared.kafka import OutboxPublisher, ensure_topics
from shared.outbox import relay_pending_outbox
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

_PUBLISHER = "hseshop.outbox_publisher"
_KICK_FLAGS = "hseshop.relay_kick_flags"
# One run drains for at most this long, then hands over to a fresh run, so a long backlog does not
# hold a worker thread forever.
MAX_RUN_SECONDS = 5.0
# A kick that no run has taken up within this long is forgotten, so a lost task message holds
# later kicks back for at most this long (beat runs the relay meanwhile).
KICK_PENDING_MS = 1000


def _publisher() -> OutboxPublisher:
    extensions = current_app.extensions
    if _PUBLISHER not in extensions:
        extensions[_PUBLISHER] = OutboxPublisher(extensions["hseshop.settings"])
    return extensions[_PUBLISHER]


def _kick_flags() -> redis.Redis:
    extensions = current_app.extensions
    if _KICK_FLAGS not in extensions:
        extensions[_KICK_FLAGS] = redis.Redis.from_url(
            extensions["hseshop.settings"].redis_url, socket_timeout=1, socket_connect_timeout=1
        )
    return extensions[_KICK_FLAGS]


def _kick_flag(service: str) -> str:
    prefix = current_app.extensions["hseshop.settings"].redis_key_prefix
    return f"{prefix}:{service}:relay-kick-pending"


@app.task(name="hseshop.relay_outbox", base=ServiceTask, ignore_result=True, acks_late=False)
def relay_outbox(service: str) -> int:
    """Send this service's unsent outbox rows, batch after batch, until none are left."""
    settings = current_app.extensions["hseshop.settings"]
    _take_kick(service)
    publisher = _publisher()
    deadline = time.monotonic() + MAX_RUN_SECONDS
    sent = 0
    while True:
        with transaction() as session:
            result = relay_pending_outbox(session, publisher.send_batch,
                                          settings.outbox_relay_batch_size)
        sent += result.sent
        if result.failed:
            log.warning("%s outbox: %d rows not acknowledged; will retry", service, result.failed)
            _recreate_topics(settings, service)
            break
        if result.skipped_busy or not result.claimed:
            break
        if time.monotonic() > deadline:
            kick_relay(service)
            break
    return sent


def _take_kick(service: str) -> None:
    # Before the first claim, so a commit landing after it kicks again and is never missed.
    try:
        _kick_flags().delete(_kick_flag(service))
    except redis.RedisError as exc:  # the flag expires by itself
        log.info("%s outbox: could not clear the kick flag: %s", service, exc)


def _recreate_topics(settings, service: str) -> None:
    # A broker that lost its topics (a fresh in-memory one, say) refuses every message until they
    # are back; creating them again costs nothing when they exist.
    try:
        ensure_topics(settings, settings.topics(), timeout=2.0)
    except Exception as exc:  # broker still down: the next run tries again
        log.info("%s outbox: cannot reach the broker to check topics: %s", service, exc)


def kick_relay(service: str) -> None:
    """Ask for a relay run now, right after a commit, unless one is already on its way; never
    fails the caller (beat is the backup)."""
    try:
        if _kick_flags().set(_kick_flag(service), 1, nx=True, px=KICK_PENDING_MS):
            relay_outbox.apply_async((service,), expires=30, retry=False)
    except Exception:
        log.warning("could not kick the %s outbox relay; beat will pick the rows up", service,
                    exc_info=True)
