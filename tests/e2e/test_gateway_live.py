"""The gateway in the running shop: the user story through the front door, live notifications to
the right user only, on either of two gateway instances, and catch-up after a reconnect."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import requests
import sqlalchemy as sa
from simple_websocket import ConnectionClosed

from bench.websocket_client import WebSocketClient
from devstack.leftovers import RecordedProcess
from devstack.stack import RUN_RECORD
from gateway_app.notifications import SOCKET_RECHECK_SECONDS
from tests.e2e.gateway_client import GatewayClient
from tests.kafka_tools import read_topic_until
from tests.polling import wait_for
from tests.replay_tools import assert_only_the_repeat_said_replayed


@pytest.fixture(scope="module")
def second_gateway(stack):
    """Another gateway instance on the same databases and Redis, as a scaled deployment runs."""
    process, url = stack.start_gateway_instance("gateway-2")
    yield url
    process.stop()


@pytest.fixture(scope="module")
def gateway_over_http(stack):
    """A gateway instance that reaches the services over HTTP (the stack's own uses gRPC)."""
    process, url = stack.start_gateway_instance("gateway-http",
                                                {"GATEWAY_UPSTREAM_TRANSPORT": "http"})
    yield url
    process.stop()


def test_a_gateway_instance_added_is_in_the_runs_record_and_one_of_the_stacks_processes(stack):
    """Started as the stack's own (start_extra): a run killed outright (SIGKILL, the OOM killer)
    has it stopped by the next run in its folder, not left serving for good (the benchmark's
    gateways held their database connections so)."""
    process, _url = stack.start_gateway_instance("gateway-recorded")
    try:
        recorded = [RecordedProcess.parse(line) for line in
                    (stack.run_dir / RUN_RECORD).read_text().splitlines()]
        assert (process.pid, "gateway-recorded") in [(p.pid, p.name) for p in recorded if p]
        assert process in stack.processes
    finally:
        process.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_retried_top_up_and_order_are_answered_as_replays(stack, gateway_over_http, transport):
    """Through the front door, over either transport: a repeat with the same key and body gets the
    first answer, byte for byte, with `Idempotent-Replayed: true`, and the money moved once; the
    first answer, and the 422 for the key reused with another body, carry no such header."""
    shopper = GatewayClient(stack.gateway_url if transport == "grpc" else gateway_over_http)
    shopper.api("POST", "/accounts", 201)
    for path, body, status, other in (
            ("/accounts/deposit", {"amount": "40"}, 200, {"amount": "41"}),
            ("/orders", {"amount": "5"}, 202, {"amount": "6"})):
        key = {"Idempotency-Key": f"{transport}-{uuid.uuid4()}"}
        first, again, reused = [
            shopper.http.post(f"{shopper.url}/api{path}", json=sent, headers=key, timeout=10)
            for sent in (body, body, other)]
        assert_only_the_repeat_said_replayed(path, status, first, again, reused,
                                             lambda answer: answer.content)
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] in ("40.00", "35.00")
    assert len(shopper.api("GET", "/orders", 200)["items"]) == 1


def test_a_shopper_signs_up_tops_up_orders_and_is_told_the_moment_it_finishes(stack):
    shopper = GatewayClient(stack.gateway_url)
    bystander = GatewayClient(stack.gateway_url)
    shopper.open_account_with(100)
    listener, other = shopper.listen(), bystander.listen()
    try:
        order = shopper.place_order(30)
        event = listener.next_for(order["id"], timeout=10)
        assert event["type"] == "OrderStatusChanged"
        assert event["payload"]["status"] == "FINISHED" and event["payload"]["amount"] == "30.00"
        assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "70.00"
        assert other.next(timeout=1.0) is None  # another user is never told
    finally:
        listener.close()
        other.close()


def test_a_page_on_either_gateway_instance_gets_its_notifications(stack, second_gateway):
    """Each socket opened with a ticket asked of the first instance (the second takes it: they
    share Redis), or with the token in its URL, as clients of before."""
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with(10)
    listeners = [shopper.listen(), shopper.listen(gateway_url=second_gateway),
                 shopper.listen(gateway_url=second_gateway, by_token=True)]
    try:
        order = shopper.place_order(50)  # more than the balance
        for listener in listeners:
            event = listener.next_for(order["id"])
            assert (event["payload"]["status"], event["payload"]["reason"]) == \
                ("CANCELLED", "INSUFFICIENT_FUNDS")
    finally:
        for listener in listeners:
            listener.close()


def test_a_page_that_reconnects_catches_up_on_what_it_missed(stack):
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with(100)
    listener = shopper.listen()
    first = shopper.place_order(10)
    seen = listener.next_for(first["id"])
    listener.close()
    missed = [shopper.place_order(n) for n in (11, 12)]
    # Both notifications stored before the page comes back, so that they can only reach it by the
    # catch-up as the socket opens, not pushed live as they are stored.
    wait_for(lambda: len(shopper.api("GET", f"/notifications?after={seen['id']}", 200)["items"])
             == len(missed), timeout=30, what="the missed orders' notifications stored")
    listener = shopper.listen(after=seen["id"])
    try:
        # Sooner than the socket's own re-read of the table (SOCKET_RECHECK_SECONDS), which would
        # make good a catch-up that left some out.
        replayed = [listener.next(timeout=SOCKET_RECHECK_SECONDS / 2) for _ in missed]
    finally:
        listener.close()
    # In the order of their ids, which is not always the order the orders were placed in: two
    # orders placed a moment apart can be settled by two handler tasks at once (see README).
    assert sorted(r["payload"]["order_id"] for r in replayed) == sorted(o["id"] for o in missed)
    assert [r["id"] for r in replayed] == sorted(r["id"] for r in replayed)
    assert all(r["id"] > seen["id"] for r in replayed)
    history = shopper.api("GET", f"/notifications?after={seen['id']}", 200)["items"]
    assert [h["id"] for h in history] == [r["id"] for r in replayed]
    assert shopper.api("GET", "/notifications/newest", 200) == {"id": replayed[-1]["id"]}


@pytest.mark.parametrize("signum, send", [
    (signal.SIGTERM, os.killpg),  # a deploy, a restart
    (signal.SIGINT, os.killpg),   # Ctrl-C in its terminal: the master and its workers alike
    (signal.SIGQUIT, os.kill),    # to the master: its quick shutdown sends its workers SIGQUIT
], ids=["SIGTERM", "SIGINT", "SIGQUIT"])
def test_a_gateway_told_to_stop_closes_its_sockets_with_1012_and_stops_at_once(stack, signum,
                                                                              send):
    """SIGTERM (a deploy, a restart), or gunicorn's quick shutdown (SIGINT, SIGQUIT): each open
    notification socket is closed with 1012 (service restart), and the gateway stops within
    seconds, where gunicorn waited for the sockets to its 30 s graceful_timeout (a quick shutdown
    left them to run on, unheard, as long), then dropped them without a close (the page saw
    1006)."""
    process, url = stack.start_gateway_instance("gateway-stopping")
    try:
        shopper = GatewayClient(stack.gateway_url)
        listener = shopper.listen(gateway_url=url)
        assert listener.next(timeout=1) is None  # open, and quiet
        began = time.monotonic()
        send(process.pid, signum)  # (its own process group, led by the master)
        # (Past graceful_timeout: what it waited, measured.)
        wait_for(lambda: not process.alive(), timeout=45, what="the gateway to stop")
        stopped_in = time.monotonic() - began
    finally:
        process.stop()
    with pytest.raises(ConnectionClosed):
        listener.next(timeout=5)
    assert listener.socket.close_reason == 1012, listener.socket.close_message
    assert stopped_in < 10, stopped_in


def test_a_gateway_worker_ending_by_itself_closes_its_sockets_with_1012(stack):
    """A worker that ends with no SIGTERM (here: max_requests served; its parent gone or --reload
    alike) closes its open notification sockets with 1012 too, where it held them to gunicorn's
    30 s graceful_timeout, then dropped them without a close."""
    process, url = stack.start_gateway_instance(
        "gateway-recycling", {"GUNICORN_CMD_ARGS": "--max-requests 10"})
    try:
        shopper = GatewayClient(stack.gateway_url)
        listener = shopper.listen(gateway_url=url)
        assert listener.next(timeout=1) is None  # open, and quiet
        # Requests until the socket's worker has served its 10, whichever worker takes them.
        deadline = time.monotonic() + 20
        with pytest.raises(ConnectionClosed):
            while time.monotonic() < deadline:
                requests.get(f"{url}/health", headers={"Connection": "close"}, timeout=5)
                listener.next(timeout=0.1)
        assert listener.socket.close_reason == 1012, listener.socket.close_message
    finally:
        process.stop()


def test_a_bad_token_cannot_open_the_notification_socket(stack):
    url = stack.gateway_url.replace("http://", "ws://") + "/api/notifications/ws?access_token=x"
    socket = WebSocketClient.connect(url)
    with pytest.raises(ConnectionClosed):
        socket.receive(timeout=5)


def test_the_request_id_follows_an_order_from_the_click_into_both_services_messages(
        stack, orders_db, payments_db, gateway_db):
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with(5)
    request_id = f"click-{uuid.uuid4().hex}"
    response = shopper.http.post(f"{stack.gateway_url}/api/orders", json={"amount": 5},
                                 headers={"X-Request-ID": request_id}, timeout=10)
    assert response.headers["X-Request-ID"] == request_id
    order = shopper.wait_until_final(response.json()["id"])
    # Every message the order caused carried it: PaymentRequested to Payments, the payment's
    # result back to Orders, OrderStatusChanged to the gateway (stored a Kafka hop after the
    # order turned final, so waited for).
    def received():
        types = {}
        for database in (payments_db, orders_db, gateway_db):
            with database.connect() as conn:
                types.update(conn.execute(sa.text(
                    "SELECT type, request_id FROM inbox_messages WHERE correlation_id = :id"),
                    {"id": order["id"]}).all())
        return types if len(types) == 3 else None

    assert wait_for(received, timeout=10, what="the order's three messages") == {
        "PaymentRequested": request_id, "PaymentSucceeded": request_id,
        "OrderStatusChanged": request_id}
    for log in ("gateway-api", "orders-grpc", "payments-worker", "orders-worker"):
        assert f"request_id={request_id}" in (stack.logs_dir / f"{log}.log").read_text(), log


def test_each_kafka_message_of_an_order_carries_its_clicks_request_id_as_causation_id(stack):
    """Read off the broker as any consumer reads them: every message an order caused (its
    PaymentRequested, its PaymentSucceeded or PaymentFailed, its OrderStatusChanged) carries the
    X-Request-ID of the click that placed it in its envelope, `causation_id`, as in its
    `request_id` header; `correlation_id` stays the order's id."""
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with(5)
    clicks = {}  # order id: the request id it was placed with
    for _ in ("paid", "refused: the 5 are spent"):
        request_id = f"click-{uuid.uuid4().hex}"
        order = shopper.place_order(5, headers={"X-Request-ID": request_id})
        clicks[order["id"]] = request_id
    assert [shopper.wait_until_final(order_id)["status"] for order_id in clicks] == [
        "FINISHED", "CANCELLED"]

    carried = {}  # (order id, type): (causation_id, request_id header)
    for topic in ("TOPIC_PAYMENT_REQUESTED", "TOPIC_PAYMENT_RESULTS", "TOPIC_ORDER_STATUS_CHANGED"):
        for message, body in _messages_of_orders(stack, stack.env[topic], set(clicks)):
            header = dict(message.headers() or []).get("request_id")
            carried[body["correlation_id"], body["type"]] = (
                body.get("causation_id", "(none)"), header and header.decode())
    (paid, refused) = clicks
    assert carried == {
        (paid, "PaymentRequested"): (clicks[paid],) * 2,
        (paid, "PaymentSucceeded"): (clicks[paid],) * 2,
        (paid, "OrderStatusChanged"): (clicks[paid],) * 2,
        (refused, "PaymentRequested"): (clicks[refused],) * 2,
        (refused, "PaymentFailed"): (clicks[refused],) * 2,
        (refused, "OrderStatusChanged"): (clicks[refused],) * 2,
    }


def _messages_of_orders(stack, topic: str, order_ids: set[str]) -> list[tuple]:
    """The messages of `topic` about these orders, with their envelopes, read from the beginning
    until each order has one (the topic holds the other tests' messages too, and values that are
    no envelope at all)."""
    of_the_orders, looked_at = [], 0

    def each_order_has_one(read) -> bool:
        nonlocal looked_at
        for message in read[looked_at:]:
            try:
                body = json.loads(message.value())
            except (TypeError, ValueError):  # (TypeError: a record without a value)
                continue
            if isinstance(body, dict) and body.get("correlation_id") in order_ids:
                of_the_orders.append((message, body))
        looked_at = len(read)
        return {body["correlation_id"] for _, body in of_the_orders} == order_ids

    read_topic_until(stack.env["KAFKA_BOOTSTRAP_SERVERS"], topic, each_order_has_one)
    return of_the_orders
