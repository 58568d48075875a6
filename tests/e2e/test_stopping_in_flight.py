"""`make run` stopped while a customer places orders: its broker keeps what it holds in memory
only, so whatever is still in flight as the workers stop is lost with it. The run stops taking
orders first, then waits for those taken to settle (every record its consumers read and stored,
every outbox sent, every inbox handled), then stops the workers: no order is left NEW for good,
none paid without its notification.

The payments handlers wait on the customer's account row, which the test holds until the stop is
past the processes that take requests: the orders taken are still in flight then, left to the
drain (without it, the workers are stopped with them).

On a stack of its own, stopped by the test."""

from __future__ import annotations

import threading

import psycopg2
import sqlalchemy as sa

from devstack.stack import FIRST_INTAKE
from shared.db import driver_dsn
from tests.e2e.conftest import database_engine, stack_of_its_own
from tests.e2e.gateway_client import GatewayClient
from tests.polling import wait_for
from tests.postgres_tools import account_row_held, other_sessions
from tests.thread_tools import OutcomeThread

LAYER = "stopping"
# Orders taken before the stop, the customer still placing more as it comes.
ORDERS_BEFORE_THE_STOP = 20
# The drain's limit here: its correctness tested, not a loaded CI machine's speed (15 s in a run).
SETTLE_SECONDS = 60


def test_a_run_stopped_while_orders_are_placed_leaves_every_order_taken_settled(
        infrastructure, run_dir, monkeypatch):
    monkeypatch.setattr("devstack.stack.SETTLE_SECONDS", SETTLE_SECONDS)
    shop = stack_of_its_own(infrastructure, run_dir, LAYER)
    placing = threading.Event()
    stopping = OutcomeThread(shop.stop, name="stopping", daemon=True)
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

        payments_database = shop.env["PAYMENTS_DATABASE_URL"]
        watcher = psycopg2.connect(driver_dsn(payments_database))
        watcher.autocommit = True
        try:
            with account_row_held(payments_database, customer.user_id):
                placing.set()
                placer = threading.Thread(target=place, name="customer", daemon=True)
                placer.start()
                with watcher.cursor() as cursor:
                    wait_for(lambda: (len(taken) >= ORDERS_BEFORE_THE_STOP
                                      and other_sessions(cursor, "wait_event_type = 'Lock'") >= 1),
                             timeout=60, what="orders taken, a payment waiting on the account")
                stopping.start()
                wait_for(lambda: FIRST_INTAKE not in {p.name for p in shop.processes},
                         timeout=60, interval=0.01, what="the stop past what takes requests")
        finally:
            watcher.close()
        stopping.joined(SETTLE_SECONDS + 60)  # (the drain's, and the stops around it)
    finally:
        placing.clear()
        if stopping.is_alive():
            stopping.join(60)
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
