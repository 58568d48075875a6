"""The user stories of the core issue, through real HTTP, Celery workers, beat and the broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import requests
import sqlalchemy as sa

from devstack.stack import REPO_ROOT
from tests.e2e.shop_client import ShopClient
from tests.kafka_tools import produce
from tests.polling import wait_for

# Enough to hold every message this layer parks: the newest come first.
PARKED_LIST_LIMIT = 1000


def test_a_paid_order_finishes_and_debits_the_account(shopper):
    shopper.open_account()
    shopper.deposit(100)
    order = shopper.place_order(30, "a book")
    assert order["status"] == "NEW"
    final = shopper.wait_until_final(order["id"], timeout=10)
    assert final["status"] == "FINISHED" and final.get("reason") is None
    assert final["updated_at"] >= final["created_at"]
    assert shopper.balance() == "70.00"


def test_each_inbox_row_keeps_when_its_message_was_produced(shopper, orders_db, payments_db):
    shopper.open_account()
    shopper.deposit(100)
    order = shopper.place_order(30)
    final = shopper.wait_until_final(order["id"], timeout=10)
    query = sa.text(
        "SELECT produced_at, received_at FROM inbox_messages WHERE correlation_id = :id")
    with payments_db.connect() as conn:
        request = conn.execute(query, {"id": order["id"]}).one()
    with orders_db.connect() as conn:
        result = conn.execute(query, {"id": order["id"]}).one()
    ordered, settled = (datetime.fromisoformat(final[k]) for k in ("created_at", "updated_at"))
    # Record timestamps are whole milliseconds, cut down from the relay's clock.
    millisecond = timedelta(milliseconds=1)
    assert ordered - millisecond <= request.produced_at <= request.received_at
    assert request.received_at <= result.produced_at <= result.received_at <= settled


def test_too_little_money_or_no_account_cancels_the_order_and_keeps_the_balance(stack):
    poor = ShopClient(stack.orders_url, stack.payments_url)
    poor.open_account()
    poor.deposit("10.00")
    cancelled = poor.wait_until_final(poor.place_order("10.01")["id"])
    assert (cancelled["status"], cancelled["reason"]) == ("CANCELLED", "INSUFFICIENT_FUNDS")
    assert poor.balance() == "10.00"

    nobody = ShopClient(stack.orders_url, stack.payments_url)
    cancelled = nobody.wait_until_final(nobody.place_order(5)["id"])
    assert (cancelled["status"], cancelled["reason"]) == ("CANCELLED", "NO_ACCOUNT")


def test_twenty_concurrent_orders_of_ten_on_a_hundred_finish_exactly_ten(shopper):
    shopper.open_account()
    shopper.deposit(100)
    with ThreadPoolExecutor(max_workers=20) as pool:
        placed = list(pool.map(
            lambda _: ShopClient(shopper.orders_url, shopper.payments_url,
                                 shopper.user_id).place_order(10), range(20)))
    finals = [shopper.wait_until_final(o["id"], timeout=30) for o in placed]
    statuses = [f["status"] for f in finals]
    assert statuses.count("FINISHED") == 10
    assert statuses.count("CANCELLED") == 10
    assert {f["reason"] for f in finals if f["status"] == "CANCELLED"} == {"INSUFFICIENT_FUNDS"}
    assert shopper.balance() == "0.00"


def _handled_at(database, message_id) -> datetime | None:
    """When the inbox message `message_id` of `database` was handled: None while it is not, or
    not stored."""
    with database.connect() as conn:
        return conn.scalar(sa.text(
            "SELECT processed_at FROM inbox_messages WHERE message_id = :id"), {"id": message_id})


def test_a_payment_request_delivered_again_or_under_a_new_id_debits_once(
        stack, shopper, payments_db):
    shopper.open_account()
    shopper.deposit(100)
    order = shopper.place_order(30)
    assert shopper.wait_until_final(order["id"])["status"] == "FINISHED"
    with payments_db.connect() as conn:  # the request as Payments received it
        row = conn.execute(sa.text(
            "SELECT message_id, type, correlation_id, payload, received_at, processed_at,"
            " attempts FROM inbox_messages WHERE correlation_id = :id"
            " AND type = 'PaymentRequested'"), {"id": order["id"]}).one()
    envelope = {"message_id": str(row.message_id), "type": row.type, "version": 1,
                "occurred_at": row.received_at.isoformat(), "correlation_id": row.correlation_id,
                "payload": row.payload}
    second_id = str(uuid.uuid4())
    topic = stack.env["TOPIC_PAYMENT_REQUESTED"]
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    for message_id in (envelope["message_id"], envelope["message_id"], second_id):
        value = json.dumps(envelope | {"message_id": message_id}).encode()
        produce(bootstrap, topic, value, key=shopper.user_id.encode(),
                headers={"message_id": message_id, "type": row.type})

    wait_for(lambda: _handled_at(payments_db, second_id), timeout=15,
             what="the copy under a new message id")
    with payments_db.connect() as conn:
        first_after = conn.execute(sa.text(
            "SELECT processed_at, attempts FROM inbox_messages WHERE message_id = :id"),
            {"id": envelope["message_id"]}).one()
        payments = conn.scalar(sa.text("SELECT count(*) FROM payments WHERE order_id = :id"),
                               {"id": order["id"]})
    # The repeats of the first id, delivered before the copy on its partition, were dropped as
    # they were stored: its row was not handled again.
    assert tuple(first_after) == (row.processed_at, row.attempts)
    assert payments == 1  # (the order's id is the payments' key: the balance shows a 2nd debit)
    assert shopper.balance() == "70.00"
    assert shopper.order(order["id"])["status"] == "FINISHED"


def test_unparseable_messages_are_parked_and_later_messages_still_flow(
        stack, shopper, orders_db, payments_db):
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    marker = f"garbage-{uuid.uuid4()}"
    for topic in (stack.env["TOPIC_PAYMENT_REQUESTED"], stack.env["TOPIC_PAYMENT_RESULTS"]):
        produce(bootstrap, topic, marker.encode(), key=shopper.user_id.encode())
    shopper.open_account()
    shopper.deposit(5)
    order = shopper.place_order(5)
    assert shopper.wait_until_final(order["id"])["status"] == "FINISHED"
    for database in (orders_db, payments_db):
        def parked():
            with database.connect() as conn:
                return conn.execute(sa.text(
                    "SELECT parked_at, processed_at, last_error FROM inbox_messages "
                    "WHERE raw_value = :raw"), {"raw": marker}).one_or_none()
        row = wait_for(parked, timeout=10, what="the unparseable message to be parked")
        assert row.parked_at is not None and row.processed_at is None
        assert "JSON" in row.last_error


def test_an_operator_lists_parked_messages_with_the_settings_the_stack_wrote(
        stack, payments_db, tmp_path):
    """`make run` writes its settings (`.run/env`): with them sourced, `python -m tasks.parked`
    reaches the stack's own database, embedded on a port of its own on a fresh machine, where the
    settings' defaults would name another server or none."""
    marker = f"garbage-{uuid.uuid4()}"
    produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], stack.env["TOPIC_PAYMENT_REQUESTED"],
            marker.encode())

    def parked():
        with payments_db.connect() as conn:
            return conn.execute(sa.text("SELECT message_id FROM inbox_messages"
                                        " WHERE raw_value = :raw AND parked_at IS NOT NULL"),
                                {"raw": marker}).scalar_one_or_none()
    message_id = wait_for(parked, timeout=30, what="the unparseable message to be parked")
    env_file = stack.write_env_file(tmp_path / "env")
    listed = subprocess.run(
        ["bash", "-c", f'set -a; . "$1"; set +a; exec "$2" -m tasks.parked list payments'
                       f' --limit {PARKED_LIST_LIMIT}', "bash", env_file, sys.executable],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")},  # no settings
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert str(message_id) in listed.stdout


def test_a_message_whose_dispatch_was_lost_is_handled_by_the_sweeper(stack, payments_db):
    customer = ShopClient(stack.orders_url, stack.payments_url)
    customer.open_account()
    customer.deposit(50)
    message_id = uuid.uuid4()
    with payments_db.begin() as conn:  # stored, as the consumer would, but never dispatched
        conn.execute(sa.text(
            "INSERT INTO inbox_messages (message_id, topic, partition, \"offset\", type, payload, "
            "received_at) VALUES (:id, 'hand-made', 0, 0, 'PaymentRequested', "
            "CAST(:payload AS jsonb), now() - interval '1 minute')"),
            {"id": message_id, "payload": json.dumps(
                {"order_id": str(uuid.uuid4()), "user_id": customer.user_id, "amount": "20.00"})})

    wait_for(lambda: _handled_at(payments_db, message_id), timeout=20,
             what="the sweeper to dispatch the stalled message")
    assert customer.balance() == "30.00"


def test_bad_input_over_http_is_a_4xx_json_error(stack, shopper):
    response = shopper.http.post(f"{stack.orders_url}/orders", data="{", timeout=10,
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MALFORMED_REQUEST"
    response = shopper.http.post(f"{stack.orders_url}/orders", json={"amount": "0.001"},
                                 timeout=10)
    assert response.status_code == 422
    response = requests.get(f"{stack.orders_url}/orders", timeout=10)
    assert response.status_code == 401
    response = requests.get(f"{stack.orders_url}/orders", timeout=10,
                            headers={"X-User-ID": shopper.user_id})  # not signed by the gateway
    assert response.status_code == 401
    assert shopper.http.get(f"{stack.orders_url}/orders", timeout=10).json()["items"] == []
