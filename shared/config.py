"""The one home of configuration: every setting any HseShop process reads, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

SERVICES = ("orders", "payments")


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
    relay_batch_size: int
    relay_interval_seconds: float
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


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def load_settings() -> Settings:
    """Read the environment now (tests and tools that change it call this directly)."""
    redis_url = _env("REDIS_URL", "redis://127.0.0.1:6379/0")
    return Settings(
        orders_database_url=_env(
            "ORDERS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/hseshop_orders"
        ),
        payments_database_url=_env(
            "PAYMENTS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/hseshop_payments"
        ),
        redis_url=redis_url,
        celery_broker_url=_env("CELERY_BROKER_URL", redis_url),
        kafka_bootstrap_servers=_env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        kafka_consumer_group_prefix=_env("KAFKA_CONSUMER_GROUP_PREFIX", "hseshop"),
        kafka_session_timeout_ms=int(_env("KAFKA_SESSION_TIMEOUT_MS", "6000")),
        kafka_topic_partitions=int(_env("KAFKA_TOPIC_PARTITIONS", "3")),
        topic_payment_requested=_env("TOPIC_PAYMENT_REQUESTED", "orders.payment-requested"),
        topic_payment_results=_env("TOPIC_PAYMENT_RESULTS", "payments.payment-results"),
        relay_batch_size=int(_env("OUTBOX_RELAY_BATCH_SIZE", "500")),
        relay_interval_seconds=float(_env("OUTBOX_RELAY_INTERVAL_SECONDS", "0.5")),
        inbox_sweep_interval_seconds=float(_env("INBOX_SWEEP_INTERVAL_SECONDS", "5")),
        inbox_sweep_min_age_seconds=float(_env("INBOX_SWEEP_MIN_AGE_SECONDS", "10")),
        inbox_max_attempts=int(_env("INBOX_MAX_ATTEMPTS", "5")),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return load_settings()
