"""A worker crashes (SIGKILL) with orders in flight: its Kafka consumer leaves its group without
committing, its prefetched and running tasks are lost, and the relay it may lead loses its lock.
Started again, the shop finishes every order, and takes each payment once."""

from __future__ import annotations

import os
import signal

import sqlalchemy as sa

from tests.e2e.shop_client import ShopClient
from tests.polling import wait_for


def test_a_payments_worker_killed_mid_flow_loses_no_order_and_charges_none_twice(
        stack, payments_db):
    customer = ShopClient(stack.orders_url, stack.payments_url)
    customer.open_account()
    customer.deposit(100)
    (worker,) = [process for process in stack.processes if process.name == "payments-worker"]
    paid_before = customer.place_order(1)
    customer.wait_until_final(paid_before["id"], timeout=30)  # the worker at work
    placed = [paid_before] + [customer.place_order(1) for _ in range(10)]  # in flight as it dies
    os.killpg(worker.pid, signal.SIGKILL)
    try:
        wait_for(lambda: not worker.alive(), timeout=10, what="the killed worker to be gone")
        placed += [customer.place_order(1) for _ in range(10)]  # taken while no worker pays
    finally:  # (the tests after this one need the worker)
        if not worker.alive():
            worker.start()
    placed += [customer.place_order(1) for _ in range(10)]
    finals = [customer.wait_until_final(order["id"], timeout=90) for order in placed]
    assert [final["status"] for final in finals] == ["FINISHED"] * len(placed)
    ids = [order["id"] for order in placed]
    with payments_db.connect() as conn:
        charged = dict(conn.execute(sa.text(
            "SELECT order_id::text, count(*) FROM payments"
            " WHERE order_id = ANY(CAST(:ids AS uuid[])) GROUP BY order_id"), {"ids": ids}).all())
    assert charged == {order["id"]: 1 for order in placed}
    assert customer.balance() == "69.00"
