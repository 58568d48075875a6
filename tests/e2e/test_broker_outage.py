"""The broker goes away: the shop keeps taking orders, and delivers them all when it is back.

The stack's broker comes back empty (the test broker keeps nothing on disk), and the e2e tests
after this one run on it: so the test ends once every consumer, the gateway's too, has its
messages again.
"""

from __future__ import annotations

import sqlalchemy as sa

from tests.e2e.shop_client import ShopClient
from tests.polling import wait_for


def test_with_the_broker_stopped_orders_are_accepted_and_all_complete_once_it_is_back(
        stack, orders_db, gateway_db):
    customer = ShopClient(stack.orders_url, stack.payments_url)
    customer.open_account()
    customer.deposit(100)
    stack.stop_broker()
    try:
        placed = [customer.place_order(10) for _ in range(5)]  # each one asserts its 202

        def piled_up_with_an_error():
            # The rows the broker refused hold their error; the later rows of their key (the
            # customer's) wait behind them, untried, until they are sent.
            with orders_db.connect() as conn:
                rows, errors = conn.execute(sa.text(
                    "SELECT count(*), count(last_error) FROM outbox_messages"
                    " WHERE correlation_id = ANY(:ids)"),
                    {"ids": [o["id"] for o in placed]}).one()
            return rows == len(placed) and errors >= 1

        wait_for(piled_up_with_an_error, timeout=30, interval=0.5,
                 what="the relay to record the broker's refusal")
        assert all(customer.order(o["id"])["status"] == "NEW" for o in placed)
    finally:
        stack.start_broker()
    finals = [customer.wait_until_final(o["id"], timeout=90) for o in placed]
    assert [f["status"] for f in finals] == ["FINISHED"] * 5
    assert customer.balance() == "50.00"

    def told_the_gateway():  # its notifications' inbox: the third consumer back at work
        with gateway_db.connect() as conn:
            return conn.scalar(sa.text(
                "SELECT count(*) FROM inbox_messages WHERE correlation_id = ANY(:ids)"),
                {"ids": [o["id"] for o in placed]}) == len(placed)

    wait_for(told_the_gateway, timeout=30, interval=0.5, what="the gateway to be told of each")
