"""`GET /health`: whether this service's database, Redis and the Kafka broker are reachable; and
whether its database is, for its gRPC server's health service (shared.grpc_health)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from shared.config import Settings
from shared.db import DatabaseOutageLog, db
from shared.kafka import BROKER_OUTAGE_WORDS, broker_reachable
from shared.outage_log import OutageLog

log = logging.getLogger(__name__)
health_blueprint = Blueprint("health", __name__)
# A probe asks every few seconds, and a round of checks runs once a second at most: while the
# database is away (a restart, a failover), that is said as it begins, once a minute while it
# lasts and as it ends (shared.db), not in a traceback a second, per app (named after it). Any
# other error keeps its own.
_DATABASE_OUTAGE = "hseshop.health_database_outage"
# The broker unreachable is said so too, with librdkafka's reason (its own lines are not logged).
_BROKER_OUTAGE = "hseshop.health_broker_outage"


def _database_ok() -> bool:
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:
        if not current_app.extensions[_DATABASE_OUTAGE].said_if_lost(exc):
            current_app.logger.warning("health: database unreachable", exc_info=True)
        return False
    finally:
        db.session.rollback()
    current_app.extensions[_DATABASE_OUTAGE].back()
    return True


def redis_answers(url: str) -> bool:
    """Whether the Redis at `url` answers a PING within a second."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


# How long one round of checks answers for. The gateway's /health is public and takes no sign-in:
# run for every request, a flood of them would each build a Kafka client and a Redis connection,
# and, with the broker down, hold a server thread for the broker check's 2 s. A process runs at
# most one round at a time, and one a second at most: the requests meanwhile get the last answer.
CHECKS_LAST_FOR_SECONDS = 1.0
_CHECKS = "hseshop.health_checks"
# The database's check alone, shared alike by a gRPC server's health calls (database_answers).
_DATABASE_CHECKS = "hseshop.health_database_checks"


class SharedChecks:
    """The last round of checks, shared by a process's requests; one round runs at a time."""

    def __init__(self, lasts_for: float = CHECKS_LAST_FOR_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._lasts_for = lasts_for
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, bool] | None = None
        self._checked_at = 0.0
        self._round: threading.Event | None = None  # set when the round under way ends

    def get(self, run: Callable[[], dict[str, bool]]) -> dict[str, bool]:
        with self._lock:
            fresh = self._clock() - self._checked_at < self._lasts_for
            if self._last is not None and (fresh or self._round is not None):
                return self._last
            under_way = self._round
            if under_way is None:
                self._round = threading.Event()
        if under_way is not None:  # the first round of all: nothing to answer with but its end
            under_way.wait()
            return self.get(run)
        try:
            checks = run()
            with self._lock:
                self._last, self._checked_at = checks, self._clock()
            return checks
        finally:
            with self._lock:
                self._round.set()
                self._round = None


def _run_checks() -> dict[str, bool]:
    settings: Settings = current_app.extensions["hseshop.settings"]
    return {
        "database": _database_ok(),
        # (Not the read cache's Redis, CACHE_REDIS_URL: down, reads go to the database.)
        "redis": redis_answers(settings.redis_url),
        "broker": broker_reachable(settings, timeout=2.0,
                                   outage=current_app.extensions[_BROKER_OUTAGE]),
    }


def database_answers() -> bool:
    """Whether this app's database answered its last check, as GET /health's "database" says it,
    rounds shared as theirs are (one at a time, one a second at most, its outage logged alike):
    what the service's gRPC server's health service says (shared.grpc_health). In the app's
    context."""
    checks = current_app.extensions[_DATABASE_CHECKS].get(lambda: {"database": _database_ok()})
    return checks["database"]


@health_blueprint.record_once
def _share_checks(state) -> None:
    state.app.extensions[_CHECKS] = SharedChecks()
    state.app.extensions[_DATABASE_CHECKS] = SharedChecks()
    state.app.extensions[_DATABASE_OUTAGE] = DatabaseOutageLog(log, f"the {state.app.name} health"
                                                                    " check")
    state.app.extensions[_BROKER_OUTAGE] = OutageLog(log, f"the {state.app.name} health check",
                                                     BROKER_OUTAGE_WORDS)


@health_blueprint.get("/health")
def health():
    checks = current_app.extensions[_CHECKS].get(_run_checks)
    healthy = all(checks.values())
    body = {"status": "ok" if healthy else "degraded",
            "service": current_app.name,
            "checks": {name: "ok" if ok else "unreachable" for name, ok in checks.items()}}
    return jsonify(body), 200 if healthy else 503
