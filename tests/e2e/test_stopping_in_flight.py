"""`make run` stopped while a customer places orders: its broker keeps what it holds in memory
only, so whatever is still in flight as the workers stop is lost with it. The run stops taking
orders first, then waits for those taken to settle (every outbox sent, every inbox handled),
then stops the workers: no order is left NEW for good, none paid without its notification.

On a stack of its own, stopped by the test."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from tests.e2e.conftest import database_engine, stack_of_its_own
from tests.e2e.gateway_client import GatewayClient
from tests.polling import wait_for

LAYER = "stopping"
# Orders taken before the stop, the customer still placing more as it comes.
ORDERS_BEFORE_THE_STOP = 40


def test_a_run_stopped_while_orders_are_placed_leaves_every_order_taken_settled(
        infrastructure, run_dir):
    shop = stack_of_its_own(infrastructure, run_dir, LAYER)
    placing = threading.Event()
    try:
        shop.start()
        customer = GatewayClient(shop.gateway_url)
        customer.open_account_with("100000")
        taken: list[str] = []

        def place() -> None:
            while placing.is_set():
                try:
                    taken.append(customer.place_order("1.00")["id"])
                except Exception:  # (refused or unanswered: the gateway is stopping)
                    return

        placing.set()
        placer = threading.Thread(target=place, name="customer", daemon=True)
        placer.start()
        wait_for(lambda: len(taken) >= ORDERS_BEFORE_THE_STOP, timeout=60, what="orders taken")
        shop.stop()
    finally:
        placing.clear()
        shop.stop()
    placer.join(10)
    engines = {service: database_engine(shop, service) for service in ("orders", "gateway")}
    try:
        with engines["orders"].connect() as orders:
            statuses = dict(orders.execute(sa.text(
                "SELECT id::text, status FROM orders WHERE user_id = :user"),
                {"user": customer.user_id}).all())
        with engines["gateway"].connect() as gateway:
            notified = set(gateway.execute(sa.text(
                "SELECT payload->>'order_id' FROM notifications WHERE user_id = :user"),
                {"user": customer.user_id}).scalars())
    finally:
        for engine in engines.values():
            engine.dispose()
    assert len(statuses) >= ORDERS_BEFORE_THE_STOP
    assert [order for order, status in statuses.items() if status == "NEW"] == []
    assert set(statuses) - notified == set()
