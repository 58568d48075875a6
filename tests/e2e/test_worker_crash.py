"""A worker crashes (SIGKILL) with orders in flight: its Kafka consumer leaves its group without
committing, its prefetched and running tasks are lost, and the relay it may lead loses its lock.
Started again, the shop finishes every order, and takes each payment once."""

from __future__ import annotations

import os
import signal

import psycopg2
import sqlalchemy as sa

from shared.db import driver_dsn
from tests.e2e.shop_client import ShopClient
from tests.polling import wait_for
from tests.postgres_tools import account_row_held, other_sessions


def test_a_payments_worker_killed_mid_flow_loses_no_order_and_charges_none_twice(
        stack, payments_db):
    """The kill comes while ten payment requests are stored in the payments inbox and in the
    worker's hands: its handlers wait on the customer's account row, which the test holds, so the
    worker dies with tasks running (or waiting to retry) and none of the ten handled."""
    customer = ShopClient(stack.orders_url, stack.payments_url)
    customer.open_account()
    customer.deposit(100)
    (worker,) = [process for process in stack.processes if process.name == "payments-worker"]
    paid_before = customer.place_order(1)
    customer.wait_until_final(paid_before["id"], timeout=30)  # the worker at work
    database_url = stack.env["PAYMENTS_DATABASE_URL"]
    watcher = psycopg2.connect(driver_dsn(database_url))
    watcher.autocommit = True
    try:
        with account_row_held(database_url, customer.user_id):
            in_flight = [customer.place_order(1) for _ in range(10)]

            def in_the_workers_hands() -> bool:
                with watcher.cursor() as cursor:
                    return (_unhandled(payments_db, in_flight) == 10
                            and other_sessions(cursor, "wait_event_type = 'Lock'") >= 1)

            wait_for(in_the_workers_hands, timeout=30,
                     what="the ten requests stored, a handler waiting on the account")
            os.killpg(worker.pid, signal.SIGKILL)
            wait_for(lambda: not worker.alive(), timeout=10, what="the killed worker to be gone")
        assert _unhandled(payments_db, in_flight) == 10  # lost with the worker, to be made good
        placed = [paid_before, *in_flight]
        placed += [customer.place_order(1) for _ in range(10)]  # taken while no worker pays
    finally:  # (the tests after this one need the worker)
        watcher.close()
        if not worker.alive():
            worker.start()
    placed += [customer.place_order(1) for _ in range(10)]
    finals = [customer.wait_until_final(order["id"], timeout=90) for order in placed]
    assert [final["status"] for final in finals] == ["FINISHED"] * len(placed)
    with payments_db.connect() as conn:
        charged = conn.execute(sa.text(
            "SELECT count(*) FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": [order["id"] for order in placed]}).scalar_one()
    assert charged == len(placed)  # one payment per order (its primary key), none missing
    assert customer.balance() == "69.00"  # and each taken once from the account


def _unhandled(payments_db, orders: list[dict]) -> int:
    """How many of the orders' payment requests the payments inbox holds, not yet handled."""
    with payments_db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM inbox_messages WHERE processed_at IS NULL"
            " AND correlation_id = ANY(:ids)"), {"ids": [order["id"] for order in orders]}
        ).scalar_one()
