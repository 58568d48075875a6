"""`GET /health`: whether this service's database, Redis and the Kafka broker are reachable."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from shared.config import Settings
from shared.db import db
from shared.kafka import broker_reachable

health_blueprint = Blueprint("health", __name__)


def _database_ok() -> bool:
    try:
        db.session.execute(text("SELECT 1"))
        return True
    except Exception:
        current_app.logger.warning("health: database unreachable", exc_info=True)
        return False
    finally:
        db.session.rollback()


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


@health_blueprint.get("/health")
def health():
    settings: Settings = current_app.extensions["hseshop.settings"]
    checks = {
        "database": _database_ok(),
        "redis": redis_answers(settings.redis_url),
        "broker": broker_reachable(settings, timeout=2.0),
    }
    healthy = all(checks.values())
    body = {"status": "ok" if healthy else "degraded",
            "service": current_app.name,
            "checks": {name: "ok" if ok else "unreachable" for name, ok in checks.items()}}
    return jsonify(body), 200 if healthy else 503
