"""The database drops every connection mid-flow, as a PostgreSQL restart or failover does: every
session of the orders' and the payments' databases ended at once, three times a few hundred ms
apart, while a customer places orders one after another and earlier ones wait in the payments
inbox and in its handlers. Each process of the shop connects again by itself, none restarted:
every order taken finishes, each paid once, and nothing is left waiting.

On a stack of its own: its every session is ended, the relays' and consumers' included, and the
package's engines' would be too; were the shop not to recover, the tests after this one would fail
for its sake."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal
from itertools import cycle

import pytest
import sqlalchemy as sa

from tests.e2e.conftest import database_engine, stack_of_its_own
from tests.e2e.shop_client import ShopClient
from tests.polling import wait_for
from tests.postgres_tools import (EndedSession, account_row_held, end_every_session,
                                  wait_for_sessions_waiting_on_a_lock)

LAYER = "database-drop"
DATABASES = ("orders", "payments")
DROPS = 3
AMOUNTS = ("1.10", "2.35", "0.05")
# Orders taken before the first drop, and after the last one, before the customer stops.
ORDERS_BEFORE = ORDERS_AFTER = 20
# Orders taken between one drop and the next (the orders API back at work): a few hundred ms.
ORDERS_BETWEEN_DROPS = 5
# Payment requests stored in the payments inbox and held up, at the first drop.
REQUESTS_HELD_UP = 5


@pytest.fixture(scope="module")
def shop(infrastructure, run_dir):
    shop = stack_of_its_own(infrastructure, run_dir, LAYER)
    try:
        shop.start()
        yield shop
    finally:
        shop.stop()


@pytest.fixture(scope="module")
def databases(shop):
    # Pinged before use: the drops end the test's own pooled connections too.
    engines = {service: database_engine(shop, service, pool_pre_ping=True)
               for service in DATABASES}
    yield engines
    for engine in engines.values():
        engine.dispose()


class Customer(threading.Thread):
    """Places orders one after another, each asked again with its key until taken, until
    stopped; keeps the orders taken and what the refused tries were told."""

    def __init__(self, client: ShopClient):
        super().__init__(name="customer", daemon=True)
        self.client = client
        self.taken: list[dict] = []
        self.refusals: list[str] = []
        self.failure: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            for amount in cycle(AMOUNTS):
                if self._stopping.is_set():
                    return
                order, refusals = self.client.place_order_until_taken(amount, str(uuid.uuid4()))
                self.taken.append(order)
                self.refusals += refusals
        except BaseException as exc:  # (an answer neither 202 nor 503: the test fails with it)
            self.failure = exc

    def stop(self) -> list[dict]:
        """Stop once the order under way is taken; returns every order taken."""
        self._stopping.set()
        self.join(60)
        assert not self.is_alive(), "the customer's last order was never taken"
        if self.failure is not None:
            raise self.failure
        return self.taken

    def has_taken(self, count: int) -> bool:
        if self.failure is not None:
            raise self.failure
        return len(self.taken) >= count


def test_every_connection_of_both_databases_ended_mid_flow_loses_no_order_and_charges_none_twice(
        shop, databases):
    client = ShopClient(shop.orders_url, shop.payments_url)
    client.open_account()
    client.deposit("1000.00")
    client.wait_until_final(client.place_order("1.00")["id"], timeout=30)  # the shop at work
    processes = {process.name: process.pid for process in shop.processes}
    customer = Customer(client)
    customer.start()
    payments_url = shop.env["PAYMENTS_DATABASE_URL"]
    try:
        wait_for(lambda: customer.has_taken(ORDERS_BEFORE), timeout=30,
                 what="the customer's first orders to be taken")
        # The payment handlers wait on the customer's account (until the first drop ends the
        # session holding it), so that requests wait in the payments inbox and in the handlers.
        with account_row_held(payments_url, client.user_id):
            wait_for(lambda: _waiting(databases["payments"])[1] >= REQUESTS_HELD_UP, timeout=30,
                     what="payment requests to wait in the payments inbox")
            wait_for_sessions_waiting_on_a_lock(payments_url, timeout=30,
                                                what="a payment handler waiting on the account")
            drops = _drop_every_connection(shop, customer)
        taken_by_the_drops = len(customer.taken)
        wait_for(lambda: customer.has_taken(taken_by_the_drops + ORDERS_AFTER), timeout=60,
                 what="orders to be taken again after the drops")
    finally:
        placed = customer.stop()
    # The drops reached every piece: the orders API answered 503 to a try or more (asked again,
    # as each was), and among the sessions ended were each database's relay leader's (its LISTEN,
    # its lock) and inbox consumer's (the last thing it ran was storing a batch).
    assert customer.refusals
    for service in DATABASES:
        ended = [session for drop in drops for session in drop[service]]
        assert any(session.led_the_relay for session in ended), service
        assert any(session.query.lstrip().startswith("INSERT INTO inbox_messages")
                   for session in ended), service

    finals = [client.wait_until_final(order["id"], timeout=60) for order in placed]
    assert [final["status"] for final in finals] == ["FINISHED"] * len(placed)
    with databases["payments"].connect() as conn:
        charged = conn.scalar(sa.text(
            "SELECT count(*) FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": [order["id"] for order in placed]})
    assert charged == len(placed)  # one payment per order (its primary key), none missing
    spent = sum((Decimal(order["amount"]) for order in placed), Decimal("1.00"))
    assert client.balance() == str(Decimal("1000.00") - spent)  # each taken once
    for service, engine in databases.items():
        wait_for(lambda engine=engine: _waiting(engine) == (0, 0), timeout=30,
                 what=f"the {service} outbox and inbox to drain")
    assert {process.name: process.pid for process in shop.processes} == processes
    assert all(process.alive() for process in shop.processes)


def _drop_every_connection(shop, customer: Customer) -> list[dict[str, list[EndedSession]]]:
    """End every session of both databases, DROPS times, ORDERS_BETWEEN_DROPS taken apart."""
    drops = []
    for _ in range(DROPS):
        taken = len(customer.taken)
        drops.append({service: end_every_session(shop.env[f"{service.upper()}_DATABASE_URL"])
                      for service in DATABASES})
        wait_for(lambda: customer.has_taken(taken + ORDERS_BETWEEN_DROPS), timeout=30,
                 what="the orders API to take orders again")
    return drops


def _waiting(engine: sa.Engine) -> tuple[int, int]:
    """How many outbox rows are left to send, and inbox messages unhandled (or parked)."""
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(
            "SELECT (SELECT count(*) FROM outbox_messages),"
            " (SELECT count(*) FROM inbox_messages WHERE processed_at IS NULL)")).one())
