"""The one home of configuration: every setting any HseShop process reads, from the environment.

`ENVIRONMENT` lists each variable with its local default; deployment files are checked against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache

SERVICES = ("orders", "payments")

# Environment variable -> default that works on a developer's machine.
ENVIRONMENT: dict[str, str] = {
    "ORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_orders",
    "PAYMENTS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_payments",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "CELERY_BROKER_URL": "",  # empty: the same as REDIS_URL
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "KAFKA_CONSUMER_GROUP_PREFIX": "hseshop",
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    "KAFKA_TOPIC_PARTITIONS": "3",
    "TOPIC_PAYMENT_REQUESTED": "orders.payment-requested",
    "TOPIC_PAYMENT_RESULTS": "payments.payment-results",
    "OUTBOX_RELAY_BATCH_SIZE": "500",
    "OUTBOX_RELAY_INTERVAL_SECONDS": "0.5",
    "INBOX_SWEEP_INTERVAL_SECONDS": "5",
    "INBOX_SWEEP_MIN_AGE_SECONDS": "10",
    "INBOX_MAX_ATTEMPTS": "5",
}


@dataclass(frozen=True)
class Settings:
    orders_database_url: str
    payments_database_url: str
    redis_url: str
    celery_broker_url: str
    kafka_bootstrap_servers: str
    kafka_consumer_group_prefix: str
    kafka_session_timeout_ms: int
    kafka_topic_partitions: int
    topic_payment_requested: str
    topic_payment_results: str
    outbox_relay_batch_size: int
    outbox_relay_interval_seconds: float
    inbox_sweep_interval_seconds: float
    inbox_sweep_min_age_seconds: float
    inbox_max_attempts: int

    def database_url(self, service: str) -> str:
        """The service's SQLAlchemy URL, always with the psycopg2 driver."""
        if service == "orders":
            url = self.orders_database_url
        elif service == "payments":
            url = self.payments_database_url
        else:
            raise ValueError(f"unknown service {service!r}")
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg2://" + url[len(plain):]
        return url

    def consumer_group(self, service: str) -> str:
        return f"{self.kafka_consumer_group_prefix}.{service}"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the environment now (tests and tools that change it call this directly)."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in fields(Settings):
        raw = environ.get(field.name.upper()) or ENVIRONMENT[field.name.upper()]
        values[field.name] = {"int": int, "float": float}.get(field.type, str)(raw)
    if not values["celery_broker_url"]:
        values["celery_broker_url"] = values["redis_url"]
    return Settings(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return load_settings()
