"""Redis, Celery's broker, goes away: the shop keeps taking orders, relays them and stores them in
the payments inbox, though no Celery task can carry them to a handler; once Redis is back, every
order finishes, each paid once.

On a stack of its own, whose every process reaches Redis through a proxy the test can cut (the
session's Redis itself is not the test's to stop)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.e2e.conftest import stack_of_its_own
from tests.e2e.shop_client import ShopClient
from tests.network_tools import SilencingProxy
from tests.polling import wait_for

LAYER = "redis-outage"


@pytest.fixture(scope="module")
def shop_and_redis(infrastructure, run_dir):
    redis = SilencingProxy(infrastructure.redis_base.removeprefix("redis://"))
    shop = stack_of_its_own(infrastructure, run_dir, LAYER, redis_base=f"redis://{redis.address}")
    try:
        shop.start()
        yield shop, redis
    finally:
        shop.stop()
        redis.close()


def test_with_redis_cut_off_orders_are_taken_and_all_finish_once_it_is_back(shop_and_redis):
    shop, redis = shop_and_redis
    customer = ShopClient(shop.orders_url, shop.payments_url)
    customer.open_account()
    customer.deposit(100)
    paid_before = customer.place_order(1)
    customer.wait_until_final(paid_before["id"], timeout=30)  # the shop at work
    payments = sa.create_engine(shop.env["PAYMENTS_DATABASE_URL"].replace(
        "postgresql://", "postgresql+psycopg2://"))
    try:
        _cut_off_and_back(customer, redis, payments, paid_before)
    finally:
        payments.dispose()


def _cut_off_and_back(customer: ShopClient, redis: SilencingProxy, payments: sa.Engine,
                      paid_before: dict) -> None:
    redis.cut()
    try:
        placed = [customer.place_order(10) for _ in range(5)]  # each one asserts its 202

        def stored_unhandled() -> int:
            with payments.connect() as conn:
                return conn.scalar(sa.text(
                    "SELECT count(*) FROM inbox_messages WHERE correlation_id = ANY(:ids)"
                    " AND processed_at IS NULL"), {"ids": [order["id"] for order in placed]})

        # Relayed over Kafka and stored as they came (neither needs Redis), but not handled.
        wait_for(lambda: stored_unhandled() == len(placed), timeout=30,
                 what="the orders' payment requests stored in the payments inbox")
        assert [customer.order(order["id"])["status"] for order in placed] == ["NEW"] * 5
    finally:
        redis.restore()
    finals = [customer.wait_until_final(order["id"], timeout=90) for order in placed]
    assert [final["status"] for final in finals] == ["FINISHED"] * len(placed)
    with payments.connect() as conn:
        charged = conn.scalar(sa.text(
            "SELECT count(*) FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": [order["id"] for order in [paid_before, *placed]]})
    assert charged == 1 + len(placed)
    assert customer.balance() == "49.00"  # each taken once
