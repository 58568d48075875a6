"""End-to-end fixtures: the whole shop as `make run` starts it (both APIs under gunicorn, a Celery
worker with its Kafka consumer per service, beat, and the broker), on free ports, under its own
names."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from devstack.infra import free_port
from devstack.stack import Stack
from shared.config import SERVICES
from tests.e2e.shop_client import ShopClient
from tests.environment import REDIS_DB, database_name, service_env


# The e2e layer's fixtures last as long as the layer: the shop it starts (some fifteen processes,
# its consumers polling all the while) is stopped before the next layer's tests run.
@pytest.fixture(scope="package")
def stack(infrastructure, run_dir):
    shop = stack_of_its_own(infrastructure, run_dir, "e2e")
    shop.start()
    yield shop
    shop.stop()


def stack_of_its_own(infrastructure, run_dir, layer: str, redis_base: str | None = None,
                     own_redis: bool = False, own_postgres: bool = False) -> Stack:
    """The whole shop, not started, on free ports and under the layer's names, with a broker of
    its own (which tests stop), on the session's PostgreSQL and Redis (or the Redis at
    `redis_base`): none of its own, embedded or not, but for a Redis of its own with `own_redis`
    (Stack's: one the test may kill), which takes no `redis_base` (it would go unused), and a
    PostgreSQL of its own with `own_postgres` (Stack's, holding the layer's databases)."""
    if own_redis and redis_base is not None:
        raise ValueError("a stack with a Redis of its own (own_redis) takes no redis_base")
    redis_base = redis_base or infrastructure.redis_base
    # ("{redis}", "{postgres}": the stack's own, once started)
    redis_url = f"{'{redis}' if own_redis else redis_base}/{REDIS_DB[layer]}"
    env = service_env(infrastructure, layer, REDIS_URL=redis_url, CELERY_BROKER_URL=redis_url)
    if own_postgres:
        env.update({f"{service.upper()}_DATABASE_URL":
                    f"{{postgres}}/{database_name(layer, service)}" for service in SERVICES})
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    return Stack(run_dir / layer, env_overrides=env,
                 ports={name: free_port() for name in ("gateway", "orders", "payments", "broker",
                                                       "orders-grpc", "payments-grpc")},
                 servers=(infrastructure.postgres_base, redis_base), own_redis=own_redis,
                 own_postgres=own_postgres)


@pytest.fixture
def shopper(stack):
    return ShopClient(stack.orders_url, stack.payments_url)


def _database(stack, service: str):
    engine = database_engine(stack, service)
    yield engine
    engine.dispose()


def database_engine(stack, service: str, **options) -> sa.Engine:
    """An engine on the `stack`'s database of `service`, for a test to read what the shop wrote
    (`options` as sqlalchemy.create_engine's); the caller disposes of it."""
    return sa.create_engine(_psycopg2(stack.env[f"{service.upper()}_DATABASE_URL"]), **options)


@pytest.fixture(scope="package")
def orders_db(stack):
    yield from _database(stack, "orders")


@pytest.fixture(scope="package")
def payments_db(stack):
    yield from _database(stack, "payments")


@pytest.fixture(scope="package")
def gateway_db(stack):
    yield from _database(stack, "gateway")


def _psycopg2(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)
