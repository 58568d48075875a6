"""The test run's own names for everything it touches: databases, topics, consumer groups and Redis
keys get a run id, so tests never see another run's (or `make run`'s) data."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from bench.shop import RELAY_SPEED_TOPIC

RUN_ID = uuid.uuid4().hex[:8]
# What every Redis key the run writes starts with (each layer's REDIS_KEY_PREFIX is under it).
REDIS_KEYS_OF_THE_RUN = f"test.{RUN_ID}."

# Redis database numbers per layer; what keeps runs apart is REDIS_KEY_PREFIX (Celery's queues
# included), so two runs at once never take each other's tasks.
REDIS_DB = {"integration": 14, "e2e": 13, "redis-outage": 12, "stopping": 11, "database-drop": 10,
            "chaos": 9}
# What every layer's processes sign and verify with: the tests' own, not the secrets published with
# the code, which a process that uses them warns of (tests/unit/test_published_secrets.py).
TEST_SECRETS = {"INTERNAL_AUTH_SECRET": "tests-own-internal-secret-4f1c9a7e2b6d",
                "AUTH_TOKEN_SECRET": "tests-own-token-secret-8e3d5b0a6c1f"}


@dataclass(frozen=True)
class Infrastructure:
    postgres_base: str  # postgresql://user@host:port, no database
    redis_base: str  # redis://host:port, no database number
    broker_port: int

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


def database_name(layer: str, service: str) -> str:
    return f"hseshop_test_{RUN_ID}_{layer}_{service}"


def service_env(infra: Infrastructure, layer: str, **overrides: str) -> dict[str, str]:
    """Every setting of shared/config.py that a test layer pins."""
    prefix = f"{REDIS_KEYS_OF_THE_RUN}{layer}"
    env = {
        "ORDERS_DATABASE_URL": f"{infra.postgres_base}/{database_name(layer, 'orders')}",
        "PAYMENTS_DATABASE_URL": f"{infra.postgres_base}/{database_name(layer, 'payments')}",
        "GATEWAY_DATABASE_URL": f"{infra.postgres_base}/{database_name(layer, 'gateway')}",
        "REDIS_URL": f"{infra.redis_base}/{REDIS_DB[layer]}",
        "CELERY_BROKER_URL": f"{infra.redis_base}/{REDIS_DB[layer]}",
        "CACHE_REDIS_URL": "",  # (REDIS_URL's, as a stack's own Redis overrides it)
        "KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap_servers,
        "KAFKA_CONSUMER_GROUP_PREFIX": prefix,
        "REDIS_KEY_PREFIX": prefix,
        "TOPIC_PAYMENT_REQUESTED": f"{prefix}.orders.payment-requested",
        "TOPIC_PAYMENT_RESULTS": f"{prefix}.payments.payment-results",
        "TOPIC_ORDER_STATUS_CHANGED": f"{prefix}.orders.order-status-changed",
        # The benchmark's relay-speed topic (bench.relay_speed), which its smoke run
        # (tests/e2e/test_bench_smoke.py) has this stack's relay send rows to: the relay parks a row
        # of a topic it is not told of.
        "OUTBOX_EXTRA_TOPICS": f"{prefix}.{RELAY_SPEED_TOPIC}",
        "INBOX_SWEEP_MIN_AGE_SECONDS": "3",
        "INBOX_SWEEP_INTERVAL_SECONDS": "1",
        "INBOX_MAX_ATTEMPTS": "5",
        **TEST_SECRETS,
    }
    env.update(overrides)
    return env
