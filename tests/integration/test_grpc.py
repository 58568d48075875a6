"""gRPC between the gateway and the services: the same answers as HTTP for every public endpoint,
deadlines and outages mapped to 504/503 (a call broken off once sent to 502), calls without the
gateway's signature refused, reflection on, and the generated code current."""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import uuid
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import grpc
import pytest
from flask.testing import FlaskClient
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from werkzeug.serving import make_server

import gateway_app
from gateway_app import upstream_grpc
from devstack.infra import free_port
from shared import grpc_server
from shared.app_closing import close_app
from shared.caller_deadline import COMMIT_GRACE_SECONDS
from shared.errors import ApiError, DatabaseBusy, DatabaseUnavailable
from shared.grpc_server import (ERROR_CODE_KEY, ERROR_DETAILS_KEY, HTTP_STATUS_KEY,
                                RETRY_AFTER_KEY, SERVER_THREADS, build_server, channel_options)
from shared.idempotency import REPLAYED_HEADER
from shared.identity import CALL_THROUGH_THE_GATEWAY
from shared.internal_auth import DEADLINE_HEADER, grpc_identity_metadata
from shared.protos import orders_pb2, orders_pb2_grpc
from shared.request_context import current_request_id
from tests.integration.test_gateway import (assert_refusals_kept_as_the_operation_made_them,
                                           assert_replays_said_so)
from tests.integration.test_http_api import AMOUNTS_BEYOND_THE_READERS
from tests.integration.test_gateway import upstreams  # noqa: F401  (the services over HTTP)
from tests.dns_tools import MovableNameServer
from tests.network_tools import Accepting, HoldingProxy, SilencingProxy
from tests.openapi_tools import assert_headers_documented
from tests.process_tools import start_child
from tests.signed_requests import MALFORMED_DEADLINES_IN_METADATA, grpc_signed
from tests.polling import wait_for
from tests.held_calls import first_call_held
from tests.thread_tools import OutcomeThread
from tests.postgres_tools import commits_of_orders_taking, no_connection_free

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grpc_targets(orders_flask_app, payments_flask_app):
    targets, servers = {}, []
    for service, app in (("orders", orders_flask_app), ("payments", payments_flask_app)):
        bind = f"127.0.0.1:{free_port()}"
        server = build_server(service, app, bind)
        server.start()
        servers.append(server)
        targets[service] = bind
    yield targets
    for server in servers:
        server.stop(grace=None)


def _gateway(settings, upstreams, grpc_targets, transport, **changes):  # noqa: F811
    wiring = {"gateway_upstream_transport": transport,
              "orders_service_url": upstreams["orders"].url,
              "payments_service_url": upstreams["payments"].url,
              "orders_grpc_target": grpc_targets["orders"],
              "payments_grpc_target": grpc_targets["payments"]}
    app = gateway_app.create_app(settings=dataclasses.replace(settings, **{**wiring, **changes}))
    return app.test_client()


def _story(client) -> list[tuple[int, object]]:
    """Every public endpoint, happy and unhappy, as one user; answers with ids masked."""
    username = f"both-ways-{uuid.uuid4().hex[:8]}"
    session = client.post("/api/auth/register", json={"username": username,
                                                      "password": "long password"}).get_json()
    auth = {"Authorization": f"Bearer {session['access_token']}"}
    key = {**auth, "Idempotency-Key": f"key-{uuid.uuid4().hex}"}
    answers = []

    def ask(method, path, **kwargs):
        response = client.open(path, method=method, **kwargs)
        answers.append((response.status_code, response.get_json()))
        return response.get_json()

    ask("GET", "/api/accounts/balance", headers=auth)
    ask("POST", "/api/accounts", data="hello", content_type="text/plain", headers=auth)
    ask("POST", "/api/accounts", headers=auth)
    ask("POST", "/api/accounts", headers=auth)
    ask("POST", "/api/accounts/deposit", json={"amount": "100"}, headers=key)
    ask("POST", "/api/accounts/deposit", json={"amount": 100}, headers=key)
    ask("POST", "/api/accounts/deposit", json={"amount": "101"}, headers=key)
    ask("POST", "/api/accounts/deposit", json={"amount": "1.001"}, headers=auth)
    ask("POST", "/api/accounts/deposit", json={"amount": 5, "extra": True}, headers=auth)
    ask("POST", "/api/accounts/deposit", data="{", content_type="application/json", headers=auth)
    ask("POST", "/api/accounts/deposit", json={"amount": 1},
        headers={**auth, "Idempotency-Key": "x" * 300})
    order = ask("POST", "/api/orders", json={"amount": 30, "description": "a book"}, headers=auth)
    ask("POST", "/api/orders", json={"amount": "-3"}, headers=auth)
    ask("POST", "/api/orders", json={"amount": "NaN"}, headers=auth)
    ask("POST", "/api/orders", json={"amount": 1, "description": "\udc80\x00"}, headers=auth)
    ask("GET", "/api/orders?limit=1&unknown=1", headers=auth)
    ask("GET", "/api/orders", headers={**auth, "Idempotency-Key": "\x85" + "k" * 300,
                                       "Content-Type": "\xa0text/plain"})
    ask("POST", "/api/orders", data='{"amount": NaN}', content_type="application/json",
        headers=auth)
    ask("GET", "/api/orders", headers=auth)
    ask("GET", "/api/orders?limit=1", headers=auth)
    ask("GET", "/api/orders?limit=0", headers=auth)
    ask("GET", "/api/orders?cursor=bm9wZQ", headers=auth)
    # A query as the gateway read it, "%35" a 5 and "%zz" no escape at all, not as typed.
    ask("GET", "/api/orders?limit=%35&cursor=%zz", headers=auth)
    ask("GET", f"/api/orders/{order['id']}", headers=auth)
    ask("GET", f"/api/orders/{uuid.uuid4()}", headers=auth)
    ask("GET", "/api/orders/not-an-id", headers=auth)
    ask("GET", "/api/orders/%2E%2E", headers=auth)
    ask("GET", "/api/orders/" + "!" * 1400, headers=auth)
    ask("GET", f"/api/orders/{order['id'].upper()}", headers=auth)
    ask("GET", "/api/accounts/balance", headers=auth)
    # A body where the route takes none is not read, however big: no 413 over HTTP either.
    ask("GET", "/api/accounts/balance", data=json.dumps({"x": "y" * 70_000}),
        content_type="application/json", headers=auth)
    masked = json.dumps(answers, sort_keys=True)
    masked = masked.replace(session["user_id"], "<user>").replace(order["id"], "<order>")
    masked = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", "<time>", masked)
    return masked


def test_every_public_endpoint_answers_the_same_over_grpc_as_over_http(
        settings, upstreams, grpc_targets):  # noqa: F811
    over_grpc = _story(_gateway(settings, upstreams, grpc_targets, "grpc"))
    over_http = _story(_gateway(settings, upstreams, grpc_targets, "http"))
    assert over_grpc == over_http
    assert "ACCOUNT_EXISTS" in over_grpc and "IDEMPOTENCY_KEY_REUSED" in over_grpc


def test_a_replayed_answer_is_said_to_be_one_through_the_gateway_over_grpc(
        settings, upstreams, grpc_targets):  # noqa: F811
    """The service marks the reply in its trailers; the gateway answers Idempotent-Replayed."""
    assert_replays_said_so(_gateway(settings, upstreams, grpc_targets, "grpc"))


def test_a_refusal_its_operation_made_is_kept_under_its_key_through_the_gateway_over_grpc(
        settings, upstreams, grpc_targets):  # noqa: F811
    """The service marks the refusal it answers again in its trailers, as a reply; the gateway
    answers it Idempotent-Replayed."""
    assert_refusals_kept_as_the_operation_made_them(
        _gateway(settings, upstreams, grpc_targets, "grpc"))


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_an_order_id_with_an_encoded_slash_or_none_is_answered_order_not_found_either_way(
        settings, upstreams, grpc_targets, transport):  # noqa: F811
    """An order id a client built from user text, `a%2Fb` (the server decodes it to `a/b` before
    routing), or left empty (`/api/orders/`), is GET /api/orders/{order_id}'s, whose document
    gives ORDER_NOT_FOUND under 404: answered so, as `not-an-id` is, over either transport, where
    it was a 404 NOT_FOUND that no client generated from the document knows; and a 401 without
    a token, as any order's path. An order's own id still reads it."""
    client = _gateway(settings, upstreams, grpc_targets, transport)
    session = client.post("/api/auth/register", json={
        "username": f"ids-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
    auth = {"Authorization": f"Bearer {session['access_token']}"}
    order = client.post("/api/orders", json={"amount": "1.00"}, headers=auth).get_json()
    not_found = client.get("/api/orders/not-an-id", headers=auth)
    assert (not_found.status_code, not_found.get_json()["error"]["code"]) == (
        404, "ORDER_NOT_FOUND")
    for path in ("/api/orders/a%2Fb", "/api/orders/", "/api/orders//", "/api/orders/a/b",
                 f"/api/orders/{order['id']}%2F", f"/api/orders/%2E%2E%2F{order['id']}"):
        answer = client.get(path, headers=auth)
        assert (answer.status_code, answer.get_json()) == (404, not_found.get_json()), path
        assert client.head(path, headers=auth).status_code == 404, path
        assert client.get(path).get_json()["error"]["code"] == "MISSING_TOKEN", path
    read = client.get(f"/api/orders/{order['id']}", headers=auth)
    assert (read.status_code, read.get_json()["id"]) == (200, order["id"])


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_every_answer_under_the_api_says_no_store_over_either_transport(
        settings, upstreams, grpc_targets, transport):  # noqa: F811
    """One user's orders, balance, notifications and tokens, and the errors that speak of them,
    are kept by no cache on the way (a proxy caching GETs by URL would serve them to the next
    user); the page and the documents are not the API's, and keep their own headers."""
    client = _gateway(settings, upstreams, grpc_targets, transport)
    username = f"no-store-{uuid.uuid4().hex[:8]}"
    signed_up = client.post("/api/auth/register", json={"username": username,
                                                        "password": "long password"})
    auth = {"Authorization": f"Bearer {signed_up.get_json()['access_token']}"}
    stranger = client.post("/api/auth/register", json={
        "username": f"{username}-2", "password": "long password"}).get_json()
    answers = [signed_up, client.post("/api/auth/login", json={"username": username,
                                                              "password": "long password"})]

    def ask(method, path, **kwargs):
        answers.append(client.open(path, method=method, headers=auth, **kwargs))
        return answers[-1]

    ask("GET", "/api/accounts/balance")  # (404: no account yet)
    ask("POST", "/api/accounts")
    order = ask("POST", "/api/orders", json={"amount": 1}).get_json()
    for method in ("GET", "HEAD"):
        ask(method, "/api/orders?limit=1")
        ask(method, f"/api/orders/{order['id']}")
        ask(method, "/api/accounts/balance")
        ask(method, "/api/notifications?after=0")
        ask(method, "/api/notifications/newest")
    ask("GET", "/api/orders?limit=0")
    ask("GET", "/api/orders/not-an-id")
    ask("OPTIONS", "/api/orders")
    ask("POST", "/api/notifications/tickets")
    answers.append(client.get(f"/api/orders/{order['id']}", headers={
        "Authorization": f"Bearer {stranger['access_token']}"}))
    answers.append(client.get("/api/orders"))  # (401)
    answers.append(client.get("/api/nowhere"))
    assert [(a.request.method, a.request.path, a.status_code, a.headers.get("Cache-Control"))
            for a in answers if a.headers.get("Cache-Control") != "no-store"] == []
    assert {a.status_code for a in answers} >= {200, 201, 202, 204, 401, 404, 422}
    for path in ("/", "/docs/openapi.json", "/health"):
        assert "no-store" not in client.get(path).headers.get("Cache-Control", ""), path


class _SlowOrders(orders_pb2_grpc.OrdersServicer):
    def ListOrders(self, request, context):
        time.sleep(2)  # (a service slower than the deadline: the scenario, not a wait)
        return orders_pb2.OrderPage()


def _orders_served_by(servicer, workers: int) -> tuple[grpc.Server, str]:
    """A gRPC server in the test's process answering the Orders service with `servicer` on
    `workers` threads, started on a free port: the server (the caller stops it) and its address."""
    server = grpc.server(futures.ThreadPoolExecutor(workers))
    orders_pb2_grpc.add_OrdersServicer_to_server(servicer, server)
    bind = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(bind)
    server.start()
    return server, bind


def test_a_deadline_exceeded_is_504_and_a_service_down_is_503(settings, upstreams, grpc_targets,  # noqa: F811
                                                              caplog):
    """And the gateway's log says which service failed how, as over HTTP: the call may never
    have reached the service, whose log then holds nothing of it."""
    slow, slow_bind = _orders_served_by(_SlowOrders(), workers=2)
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", upstream_timeout_seconds=0.5,
                          orders_grpc_target=slow_bind,
                          payments_grpc_target=f"127.0.0.1:{free_port()}")
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        auth = {"Authorization": f"Bearer {session['access_token']}"}
        late = client.get("/api/orders", headers=auth)
        assert late.status_code == 504 and late.get_json()["error"]["code"] == "UPSTREAM_TIMEOUT"
        down = client.get("/api/accounts/balance", headers=auth)
        assert down.status_code == 503
        assert down.get_json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        said = {record.getMessage().split(":")[0] for record in caplog.records
                if record.name == "gateway_app.upstream_grpc"}
        assert said == {"orders timed out", "payments unreachable"}
    finally:
        slow.stop(grace=None)


def _orders_grpc_process(cleanup: ExitStack, bind: str | None, log_path: Path,
                         redis_url: str) -> tuple[subprocess.Popen, str]:
    """The orders service serving gRPC as it is run (`python -m shared.grpc_server`), its Redis at
    `redis_url`, its log in `log_path`, killed and waited for by `cleanup`: the process, and the
    address it listens on, `bind` or, given None, a free port's (free_port's: no proxy of the
    test's listening on a port of the system's choice meanwhile can be given it)."""
    address = bind or f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        service = start_child(
            [sys.executable, "-m", "shared.grpc_server", "orders"], cwd=REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "ORDERS_GRPC_BIND": address, "REDIS_URL": redis_url})
    cleanup.callback(service.wait)
    cleanup.callback(service.kill)
    wait_for(lambda: (f"orders gRPC listening on {address}" in log_path.read_text()
                      or service.poll() is not None), timeout=30,
             what=f"the orders gRPC server in {log_path.name}")
    if service.poll() is not None:
        raise AssertionError(f"the orders gRPC server exited ({service.returncode}):"
                             f" {log_path.read_text()}")
    return service, address


def _calls_served(log_path: Path, method: str) -> int:
    """How many calls of the orders service's `method` the gRPC server logging to `log_path`
    said it took (its access log's line, written as each call arrives)."""
    orders = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name
    return log_path.read_text().count(f"gRPC /{orders}/{method}\n")


def test_a_call_broken_off_after_the_service_committed_is_502_not_503(settings, upstreams,  # noqa: F811
                                                                       grpc_targets, tmp_path,
                                                                       caplog):
    """The orders service's process, serving gRPC as it is run, killed (SIGKILL) once it has
    placed the order and before it replies: the call was sent, and carried out, so the gateway
    answers 502 (the request may have been carried out), as the HTTP transport does for a
    connection closed without an answer, not 503 "unavailable", which denies it. The kill comes
    while the service bumps the orders' cache version after its commit (its Redis reached through
    a proxy that holds that command)."""
    import psycopg2

    from shared.db import driver_dsn

    bind = f"127.0.0.1:{free_port()}"
    with ExitStack() as cleanup:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", orders_grpc_target=bind)
        session, auth = _signed_up_with_an_account(client)
        user_id = session["user_id"]
        redis, service, _ = _orders_grpc_process_held_at_redis(
            cleanup, bind, tmp_path / "orders-grpc.log", settings, user_id)

        def kill_once_committed():
            if redis.held.wait(timeout=30):
                service.kill()

        killer = threading.Thread(target=kill_once_committed, daemon=True)
        killer.start()
        answer = client.post("/api/orders", json={"amount": "3", "description": "once"},
                             headers=auth)
        killer.join()
        assert redis.held.is_set() and service.wait(timeout=10) == -signal.SIGKILL
        assert answer.status_code == 502, answer.get_json()
        assert answer.get_json()["error"]["code"] == "BAD_GATEWAY"
        assert "orders closed the connection without answering" in caplog.text
        placed = psycopg2.connect(driver_dsn(settings.database_url("orders")))
        cleanup.callback(placed.close)
        with placed.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM orders WHERE user_id = %s", (user_id,))
            assert cursor.fetchone() == (1,)


def _orders_grpc_process_held_at_redis(cleanup: ExitStack, bind: str | None, log_path, settings,
                                       user_id: str) -> tuple[HoldingProxy, subprocess.Popen, str]:
    """An orders gRPC process (on `bind`, or a free port: _orders_grpc_process) whose Redis
    is reached through a proxy that holds the commands on `user_id`'s orders' cache version (read
    by a GET, bumped after a POST's commit): the proxy (its `held` set once it holds one), the
    process and its address, all ended by `cleanup`."""
    redis_url = urlsplit(settings.redis_url)
    redis = HoldingProxy(f"{redis_url.hostname}:{redis_url.port or 6379}",
                         marker=f"version:orders:{user_id}".encode())
    cleanup.callback(redis.close)
    process, address = _orders_grpc_process(cleanup, bind, log_path,
                                            redis_url._replace(netloc=redis.address).geturl())
    return redis, process, address


@pytest.mark.parametrize("method, key, another_listening, status, replayed", [
    ("GET", None, True, 200, None),
    ("POST", "retry-me", True, 202, "true"),
    ("POST", None, True, 502, None),
    ("POST", "retry-me", False, 502, None),
], ids=["a GET", "a POST with an Idempotency-Key", "a POST without one",
        "a POST with an Idempotency-Key, no other process listening"])
def test_a_call_whose_service_process_died_holding_it_is_sent_again_if_safe(
        settings, upstreams, grpc_targets, tmp_path, caplog,  # noqa: F811
        method, key, another_listening, status, replayed):
    """The orders service's process serving a call, killed (SIGKILL) as it holds it (a GET as it
    reads the user's orders' cache version, a POST once it has placed the order, as it bumps that
    version after its commit: its Redis reached through a proxy that holds those commands), with
    another process serving gRPC in its place. The gateway reaches them through a proxy, as
    replicas are reached through a load balancer or a service address: the connections made
    before the kill go to the dying process, every one made after it to the other (none can
    reach the dying process's listener as it closes, which two processes sharing a port with
    SO_REUSEPORT let the kernel do, the second try's connection then reset at times). A safe
    call (gateway_app/resends.py: a GET, a keyed POST) is sent again, as over HTTP: grpc-core
    makes a new connection, to the process alive, which answers it (a keyed POST with the first
    send's answer, Idempotent-Replayed); it was a 502. A POST without a key is not (it would be
    a second order): 502, one order placed, the other process never called. A keyed POST sent
    again with no process listening any more is the first send's 502 (it may have been carried
    out), not the 503 of a service never reached."""
    import psycopg2

    from shared.db import driver_dsn

    grpc_method = {"GET": "ListOrders", "POST": "PlaceOrder"}[method]
    caplog.set_level(logging.INFO, logger="gateway_app.upstream_grpc")
    with ExitStack() as cleanup:
        # (Carrying nowhere until the dying process listens: the gateway connects at its first
        # call, the warm-up below.)
        orders = SilencingProxy(f"127.0.0.1:{free_port()}")
        cleanup.callback(orders.close)
        client = _gateway(settings, upstreams, grpc_targets, "grpc",
                          orders_grpc_target=orders.address)
        _, warming_up = _signed_up_with_an_account(client)
        session, auth = _signed_up_with_an_account(client)
        user_id = session["user_id"]
        redis, dying, dying_bind = _orders_grpc_process_held_at_redis(
            cleanup, None, tmp_path / "dying.log", settings, user_id)
        orders.send_to(dying_bind)
        # The gateway's connection made to the dying process, before any other listens.
        assert client.get("/api/orders", headers=warming_up).status_code == 200
        served_before = _calls_served(tmp_path / "dying.log", grpc_method)
        if another_listening:
            alive_bind = _orders_grpc_process(cleanup, None, tmp_path / "alive.log",
                                              settings.redis_url)[1]
        else:
            alive_bind = f"127.0.0.1:{free_port()}"  # (nothing listens there)

        def kill_once_held():
            if redis.held.wait(timeout=30):
                orders.send_to(alive_bind)  # (nothing listens there with no other process)
                dying.kill()

        killer = threading.Thread(target=kill_once_held, daemon=True)
        killer.start()
        answer = client.open("/api/orders", method=method, headers={
            **auth, **({"Idempotency-Key": key} if key else {})},
            json={"amount": "3", "description": "once"} if method == "POST" else None)
        killer.join()
        assert redis.held.is_set() and dying.wait(timeout=10) == -signal.SIGKILL
        assert answer.status_code == status, answer.get_json()
        assert answer.headers.get("Idempotent-Replayed") == replayed
        said = [record.getMessage() for record in caplog.records
                if record.name == "gateway_app.upstream_grpc"]
        sent_again = [line for line in said if "sending the call again" in line]
        assert _calls_served(tmp_path / "dying.log", grpc_method) == served_before + 1
        if another_listening:
            served = _calls_served(tmp_path / "alive.log", grpc_method)
            assert served == (0 if status == 502 else 1)
        if status == 502:
            assert answer.get_json()["error"]["code"] == "BAD_GATEWAY"
            assert any(line.startswith("orders closed the connection without answering")
                       for line in said), said
            assert len(sent_again) == (1 if key else 0), said
            # The second try's own failure said too, not the first's alone.
            not_reached = [record for record in caplog.records
                           if record.name == "gateway_app.upstream_grpc"
                           and record.getMessage().startswith(
                               "orders could not be reached to send the call again (UNAVAILABLE:"
                               " failed to connect to all addresses")]
            assert [record.levelno for record in not_reached] == (
                [] if another_listening else [logging.WARNING]), said
        else:
            assert answer.get_json()["items" if method == "GET" else "status"] == (
                [] if method == "GET" else "NEW")
            assert len(sent_again) == 1 and not any("without answering:" in line
                                                    for line in said), said
        if method == "POST":
            placed = psycopg2.connect(driver_dsn(settings.database_url("orders")))
            cleanup.callback(placed.close)
            with placed.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM orders WHERE user_id = %s", (user_id,))
                assert cursor.fetchone() == (1,)


class _HoldingOrders(orders_pb2_grpc.OrdersServicer):
    """Orders whose ListOrders holds each call until the gateway gives it up (10 s at most),
    counting the calls: `held` is set once the first has come."""

    def __init__(self):
        self.held = threading.Event()
        self._calls = 0
        self._counting = threading.Lock()

    def calls(self) -> int:
        with self._counting:
            return self._calls

    def ListOrders(self, request, context):
        given_up = threading.Event()
        context.add_callback(given_up.set)
        with self._counting:
            self._calls += 1
        self.held.set()
        given_up.wait(10)
        return orders_pb2.OrderPage()


def _a_held_list_broken_off(settings, upstreams, grpc_targets, cleanup: ExitStack,  # noqa: F811
                            held_for: float, orders: _HoldingOrders | None = None, **changes):
    """A GET of /api/orders through a gateway (its settings `changes`) to `orders` (a
    _HoldingOrders where none is given) behind a proxy, whose connection is broken off `held_for`
    seconds after the call came, as the service's process dying holding it breaks it, and the
    connections made after it carried, as to another process in its place: the answer, how long
    it took, and the orders."""
    orders = orders or _HoldingOrders()
    server, bind = _orders_served_by(orders, workers=4)
    cleanup.callback(server.stop, None)
    proxy = SilencingProxy(bind)
    cleanup.callback(proxy.close)
    client = _gateway(settings, upstreams, grpc_targets, "grpc",
                      orders_grpc_target=proxy.address, **changes)
    session = client.post("/api/auth/register", json={
        "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()

    def break_off_once_held():
        if orders.held.wait(timeout=30):
            time.sleep(held_for)  # (how long the process held it: the scenario, not a wait)
            proxy.break_off()

    breaker = threading.Thread(target=break_off_once_held, daemon=True)
    breaker.start()
    started = time.monotonic()
    answer = client.get("/api/orders",
                        headers={"Authorization": f"Bearer {session['access_token']}"})
    took = time.monotonic() - started
    breaker.join()
    return answer, took, orders


def test_a_safe_call_broken_off_with_too_little_of_its_deadline_left_is_not_sent_again(
        settings, upstreams, grpc_targets, caplog, monkeypatch):  # noqa: F811
    """A GET whose connection broke once it was sent, with no more of its deadline left than a
    second try needs (gateway_app/resends.py's SECOND_TRY_NEEDS_SECONDS, made 1.5 s here, for
    a deadline of 2 s broken off 0.6 s in: no timing to hit), is the 502 of a call broken off,
    sent once."""
    caplog.set_level(logging.INFO, logger="gateway_app.upstream_grpc")
    monkeypatch.setattr(upstream_grpc, "SECOND_TRY_NEEDS_SECONDS", 1.5)
    with ExitStack() as cleanup:
        answer, _, orders = _a_held_list_broken_off(settings, upstreams, grpc_targets, cleanup,
                                                    held_for=0.6, upstream_timeout_seconds=2.0)
        assert answer.status_code == 502, answer.get_json()
        assert answer.get_json()["error"]["code"] == "BAD_GATEWAY"
        assert orders.calls() == 1
        assert "sending the call again" not in caplog.text


def test_a_safe_call_sent_again_waits_only_for_what_is_left_of_its_deadline(
        settings, upstreams, grpc_targets, caplog):  # noqa: F811
    """A GET broken off 1.5 s into its 3 s deadline is sent again, and the process that takes
    it holding it too, is a 504 at about that deadline and its grace (COMMIT_GRACE_SECONDS): the
    second try waits what is left of them (2.5 s), not a deadline of its own (5.5 s in all). The
    margins are wide for a busy machine: the break may come late, and the 504 take its time."""
    caplog.set_level(logging.INFO, logger="gateway_app.upstream_grpc")
    with ExitStack() as cleanup:
        answer, took, orders = _a_held_list_broken_off(settings, upstreams, grpc_targets,
                                                       cleanup, held_for=1.5,
                                                       upstream_timeout_seconds=3.0)
        assert answer.status_code == 504, answer.get_json()
        assert answer.get_json()["error"]["code"] == "UPSTREAM_TIMEOUT"
        assert orders.calls() == 2
        assert "sending the call again" in caplog.text
        assert 3.0 + COMMIT_GRACE_SECONDS <= took < 4.0 + COMMIT_GRACE_SECONDS, took


class _HoldingThenFailingOrders(_HoldingOrders):
    """_HoldingOrders whose ListOrders, after the first call, fails each as shared.grpc_server
    fails a call with `error` (its status, code and Retry-After in the trailers)."""

    def __init__(self, error: ApiError):
        super().__init__()
        self.error = error

    def ListOrders(self, request, context):
        if self.calls() == 0:
            return super().ListOrders(request, context)
        with self._counting:
            self._calls += 1
        grpc_server._abort(context, self.error)


@pytest.mark.parametrize("error", [DatabaseBusy, DatabaseUnavailable])
def test_a_get_sent_again_is_answered_its_second_trys_503_as_a_first_answer_would_be(
        settings, upstreams, grpc_targets, caplog, error):  # noqa: F811
    """A GET broken off once sent is sent again (as above), and the service fails the second try
    503 (DATABASE_BUSY, DATABASE_UNAVAILABLE) with Retry-After: 7. A read changes nothing, so that
    503 denies nothing the first try did: it is answered as a first answer would be, its code and
    its Retry-After passed on, and the log says the service's failure, not a closed connection.
    (The first try's 502 is a keyed POST's: gateway_app/resends.py.)"""
    caplog.set_level(logging.INFO, logger="gateway_app.upstream_grpc")
    failure = error()
    failure.headers["Retry-After"] = "7"
    with ExitStack() as cleanup:
        answer, _, orders = _a_held_list_broken_off(
            settings, upstreams, grpc_targets, cleanup, held_for=0.2,
            orders=_HoldingThenFailingOrders(failure), upstream_timeout_seconds=5.0)
        assert answer.status_code == 503, answer.get_json()
        assert answer.get_json()["error"]["code"] == failure.code
        assert answer.headers.get("Retry-After") == "7"
        assert orders.calls() == 2
    said = [record.getMessage() for record in caplog.records
            if record.name == "gateway_app.upstream_grpc"]
    assert any("sending the call again" in line for line in said), said
    assert not any("closed the connection without answering:" in line
                   or "the first try's failure is answered" in line for line in said), said


def test_a_keyed_deposit_sent_again_while_its_first_try_holds_its_key_is_the_first_trys_502(
        settings, upstreams, grpc_targets, monkeypatch, caplog):  # noqa: F811
    """A keyed deposit whose connection breaks 0.5 s into its work (its key claimed, its
    transaction open 3 s: the service's process dying holding it, say, or a proxy's connection
    cut) is sent again; the second try's key waits on the first's, uncommitted, for
    lock_timeout (2 s), and is refused 503 IDEMPOTENCY_KEY_IN_USE; the first then commits. The
    gateway answers the first try's 502 ("may have been carried out"): it answered the second
    try's 503 DATABASE_BUSY, "nothing was changed", with the money moved. Retried under the key,
    the deposit is answered the first try's answer, replayed: the money moved once."""
    from payments_app import service

    caplog.set_level(logging.INFO, logger="gateway_app.upstream_grpc")
    proxy = SilencingProxy(grpc_targets["payments"])
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", upstream_timeout_seconds=5.0,
                          payments_grpc_target=proxy.address)
        session, auth = _signed_up_with_an_account(client)
        at_work = first_call_held(monkeypatch, service, "deposit", 3)  # (the first try's work)

        def break_off_once_at_work():
            if at_work.wait(timeout=30):
                time.sleep(0.5)  # (how long into its work it broke: the scenario, not a wait)
                proxy.break_off()

        breaker = OutcomeThread(break_off_once_at_work, name="breaker")
        breaker.start()
        keyed = {**auth, "Idempotency-Key": str(uuid.uuid4())}
        answer = client.post("/api/accounts/deposit", json={"amount": "10"}, headers=keyed)
        breaker.joined(timeout=10)
        assert answer.status_code == 502, answer.get_json()
        assert answer.get_json()["error"]["code"] == "BAD_GATEWAY"
        assert "sending the call again" in caplog.text
        assert "IDEMPOTENCY_KEY_IN_USE" in caplog.text  # (the second try's own failure, said)
        wait_for(lambda: client.get("/api/accounts/balance", headers=auth).get_json()[
            "balance"] == "10.00", timeout=10, what="the first try committed")
        retried = client.post("/api/accounts/deposit", json={"amount": "10"}, headers=keyed)
        assert (retried.status_code, retried.get_json()["balance"]) == (200, "10.00")
        assert retried.headers.get("Idempotent-Replayed") == "true"
        assert client.get("/api/accounts/balance",
                          headers=auth).get_json()["balance"] == "10.00"
    finally:
        proxy.close()


def test_a_connection_to_a_service_gone_silent_is_dropped_and_made_afresh(
        settings, upstreams, grpc_targets, orders_flask_app, monkeypatch):  # noqa: F811
    """The gateway's channel pings a quiet connection: one gone silent is found out and dropped,
    and the next calls go over a new one (without the pings, every call on the silent one waits
    out its deadline, a 504, for as long as TCP keeps the connection: hours)."""
    monkeypatch.setattr(grpc_server, "KEEPALIVE_TIME_MS", 1000)
    monkeypatch.setattr(grpc_server, "KEEPALIVE_TIMEOUT_MS", 1000)
    monkeypatch.setattr(grpc_server, "PINGS_ACCEPTED_EVERY_MS", 500)
    bind = f"127.0.0.1:{free_port()}"
    server = build_server("orders", orders_flask_app, bind)
    server.start()
    proxy = SilencingProxy(bind)
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", upstream_timeout_seconds=1.0,
                          orders_grpc_target=proxy.address)
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        auth = {"Authorization": f"Bearer {session['access_token']}"}
        assert client.get("/api/orders", headers=auth).status_code == 200
        proxy.silence()
        wait_for(lambda: client.get("/api/orders", headers=auth).status_code == 200, timeout=20,
                 what="a call over a fresh connection")
    finally:
        proxy.close()
        server.stop(grace=None)


_LIST_ORDERS = "/hseshop.orders.v1.Orders/ListOrders"


def _calls_whose_request_never_comes(channel: grpc.Channel, how_many: int,
                                     given_up: threading.Event) -> list[grpc.Future]:
    """`how_many` calls of ListOrders on `channel`, with no metadata (no sign-in), each sending
    its headers and, until `given_up` is set, never its request: the futures of their ends."""
    def nothing_sent():
        given_up.wait()
        return
        yield  # (a generator: the request stream, ended with no message)

    stream = channel.stream_unary(_LIST_ORDERS)
    return [stream.future(nothing_sent()) for _ in range(how_many)]


def test_calls_whose_request_never_comes_hold_a_servers_threads_only_till_their_connections_age(
        settings):
    """grpcio reads a call's request on a thread of the server's, with no timeout, and its
    identity is checked only once the request has come: SERVER_THREADS calls from anyone that
    sent their headers and never their request held every thread, and every call after them
    waited out its deadline, for as long as they liked. A server closes each connection at its
    age (1 s here), the calls on it given the gateway's whole wait and a second (3 s here), and
    the calls whose request never came with it: their threads freed, the service answers."""
    import orders_app

    app = orders_app.create_app(settings=dataclasses.replace(settings,
                                                             upstream_timeout_seconds=1.0))
    bind = f"127.0.0.1:{free_port()}"
    server = build_server("orders", app, bind, connection_age_seconds=1.0)
    server.start()
    given_up = threading.Event()
    holding = grpc.insecure_channel(bind)
    try:
        held = _calls_whose_request_never_comes(holding, SERVER_THREADS, given_up)
        with grpc.insecure_channel(bind) as channel:
            stub = orders_pb2_grpc.OrdersStub(channel)
            request = orders_pb2.ListOrdersRequest()
            user = f"usr_{uuid.uuid4().hex[:16]}"

            def answered(timeout: float) -> bool | None:
                """True if answered, False if not in `timeout`; None if cut off by its own
                connection's age (1 s here, with 3 s of grace: on a loaded machine grpc-core may
                take the GOAWAY late and send a call on the closing connection), which tells
                neither way."""
                try:
                    stub.ListOrders(request, metadata=grpc_signed(user, _LIST_ORDERS, request),
                                    timeout=timeout)
                    return True
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and "max_age" in (
                            exc.details() or ""):
                        return None
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    return False

            wait_for(lambda: answered(0.3) is False, timeout=10, what="every thread held")
            wait_for(lambda: answered(1.0) is True, timeout=15, what="a call answered again")
        wait_for(lambda: all(call.done() for call in held), timeout=10,
                 what="the held calls ended")
        assert {call.exception().code() for call in held} == {grpc.StatusCode.UNAVAILABLE}
    finally:
        given_up.set()
        holding.close()
        server.stop(grace=None)
        close_app(app)


def test_a_call_past_what_a_server_takes_in_hand_is_a_503_with_retry_after_at_once(
        settings, upstreams, grpc_targets, orders_flask_app):  # noqa: F811
    """A server takes CALLS_IN_HAND_PER_THREAD calls a thread in hand, those waiting for a
    thread among them; one more is refused at once (RESOURCE_EXHAUSTED, grpcio's own: no
    trailers of the service's), and the gateway answers it 503 SERVICE_UNAVAILABLE with
    Retry-After (the call never ran). It was queued without bound, each waiting out its
    deadline: a 504 "may have been carried out"."""
    bind = f"127.0.0.1:{free_port()}"
    server = build_server("orders", orders_flask_app, bind)
    server.start()
    given_up = threading.Event()
    holding = grpc.insecure_channel(bind)
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", upstream_timeout_seconds=1.0,
                          orders_grpc_target=bind)
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        auth = {"Authorization": f"Bearer {session['access_token']}"}
        assert client.get("/api/orders", headers=auth).status_code == 200
        held = _calls_whose_request_never_comes(  # (kept: a call's future dropped cancels it)
            holding, grpc_server.CALLS_IN_HAND_PER_THREAD * SERVER_THREADS, given_up)

        def refused() -> tuple[object, float] | None:
            started = time.monotonic()
            answer = client.get("/api/orders", headers=auth)
            return (answer, time.monotonic() - started) if answer.status_code == 503 else None

        answer, took = wait_for(refused, timeout=15, what="a call refused")
        assert answer.get_json()["error"] == {
            "code": "SERVICE_UNAVAILABLE", "details": {"service": "orders"},
            "message": "The orders service is too busy just now; try again shortly."}
        assert answer.headers["Retry-After"] == "1"
        assert took < 0.5, took
        assert not any(call.done() for call in held)  # (those in hand still held)
    finally:
        given_up.set()
        holding.close()
        server.stop(grace=None)


def test_calls_are_answered_on_as_a_server_closes_their_connections_at_their_age(
        settings, upstreams, grpc_targets, orders_flask_app):  # noqa: F811
    """A server closes each connection at its age (0.3 s here), telling the gateway's channel
    first (GOAWAY) to make its new calls on a new one; a call caught on its way grpc-core sends
    again on the new one, as it knows the server never took it, and a call the server took is
    given the gateway's deadline to be answered. No call fails for it, a POST without a key
    (which the gateway never sends again itself) among them."""
    bind = f"127.0.0.1:{free_port()}"
    server = build_server("orders", orders_flask_app, bind, connection_age_seconds=0.3)
    server.start()
    proxy = SilencingProxy(bind)  # (to count the connections the gateway makes)
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc",
                          orders_grpc_target=proxy.address)
        _, auth = _signed_up_with_an_account(client)
        answers = []

        def five_connections_made() -> bool:
            answers.append(client.get("/api/orders", headers=auth))
            answers.append(client.post("/api/orders", json={"amount": "1.00"}, headers=auth))
            return proxy.connections_carried() >= 5

        wait_for(five_connections_made, timeout=30, what="five connections made in turn",
                 interval=0)
        assert {answer.status_code for answer in answers} == {200, 202}, [
            answer.get_json() for answer in answers if answer.status_code not in (200, 202)]
    finally:
        proxy.close()
        server.stop(grace=None)


def test_a_server_on_a_port_another_listens_on_fails_to_start(orders_flask_app):
    """grpc-core listens with SO_REUSEPORT unless told not to: a second server on a port a first
    (a stale one, say) listens on started as if the port were its own, and the kernel shared the
    connections out between them."""
    bind = f"127.0.0.1:{free_port()}"
    first = build_server("orders", orders_flask_app, bind)
    first.start()
    try:
        with pytest.raises(RuntimeError):
            build_server("orders", orders_flask_app, bind)
    finally:
        first.stop(grace=None)


def test_a_channel_tries_a_service_it_cannot_reach_again_every_second_at_most():
    """Not after gRPC's own backoff, growing to two minutes, in which every call fails at once:
    the gateway would answer 503 for minutes after the service came back."""
    refusing = socket.create_server(("127.0.0.1", 0))  # takes each connection and closes it
    tries = []

    def refuse(connection: socket.socket) -> None:
        tries.append(time.monotonic())
        connection.close()

    accepting = Accepting(refusing, refuse)
    channel = grpc.insecure_channel(f"127.0.0.1:{refusing.getsockname()[1]}",
                                    options=channel_options())
    stub = orders_pb2_grpc.OrdersStub(channel)
    try:
        calling_until = time.monotonic() + 7  # (gRPC's own backoff waits 2 s or more by then)
        while time.monotonic() < calling_until:  # a gateway's calls, each failing at once
            with pytest.raises(grpc.RpcError):
                stub.ListOrders(orders_pb2.ListOrdersRequest(), timeout=0.2)
            time.sleep(0.1)  # (a call every 0.1 s: the scenario, not a wait)
    finally:
        channel.close()
        accepting.close()  # (the listener with it)
    waits = [later - earlier for earlier, later in zip(tries, tries[1:])]
    assert len(tries) >= 6 and max(waits) < 1.5, waits


def _port_free_on(*hosts: str) -> int:
    """A port nothing listens on at any of `hosts` (loopback addresses), as a service's port is
    the same wherever a redeploy puts it."""
    while True:
        port = free_port()
        try:
            for host in hosts:
                socket.create_server((host, port)).close()
        except OSError:
            continue
        return port


@dataclasses.dataclass
class _OrdersToBeMoved:
    """The orders service at a name of `names`'s, resolving to 127.0.0.2, where `old` serves it;
    `new` built to serve it at 127.0.0.3, on the same port, not started; a gateway (`client`)
    calling it by that name, as `auth`'s user, and having called it once."""

    names: MovableNameServer
    old: grpc.Server
    new: grpc.Server
    client: FlaskClient
    auth: dict[str, str]

    def orders_listed(self) -> int:
        """The status of GET /api/orders through the gateway."""
        return self.client.get("/api/orders", headers=self.auth).status_code


@pytest.fixture
def orders_to_be_moved(settings, upstreams, grpc_targets, orders_flask_app):  # noqa: F811
    port = _port_free_on("127.0.0.2", "127.0.0.3")
    names = MovableNameServer("127.0.0.2")
    old = build_server("orders", orders_flask_app, f"127.0.0.2:{port}")
    old.start()
    new = build_server("orders", orders_flask_app, f"127.0.0.3:{port}")
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc",
                          orders_grpc_target=names.target(f"orders-{uuid.uuid4().hex[:8]}.test",
                                                          port),
                          rate_limit_per_minute=10_000)  # (a test may call every 0.1 s)
        _, auth = _signed_up_with_an_account(client)
        moving = _OrdersToBeMoved(names, old, new, client, auth)
        assert moving.orders_listed() == 200  # (the name looked up)
        yield moving
    finally:
        old.stop(grace=None)
        new.stop(grace=None)
        names.close()


def test_a_service_moved_to_a_new_address_is_called_there_within_seconds(orders_to_be_moved,
                                                                         monkeypatch):
    """As a redeploy moves a container: its name resolves to another address, where the new
    server listens, and the gateway's channel looks the name up again within about a second of
    losing the old server. gRPC's own least time between lookups is 30 s, and the gateway
    answered 503 for up to half a minute after the move."""
    # (The channel's own lookups: not a channel made afresh, as its calls fail on, for them.)
    monkeypatch.setattr(upstream_grpc, "CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS", 60.0)
    moving = orders_to_be_moved
    moving.old.stop(grace=None)
    moving.names.address = "127.0.0.3"
    moving.new.start()
    wait_for(lambda: moving.orders_listed() == 200, timeout=5,
             what="a call answered at the new address")  # (30 s and more before)


def test_a_service_whose_name_stopped_resolving_for_a_while_is_called_within_seconds_of_its_return(
        orders_to_be_moved):
    """As a container replaced slowly leaves its name unresolved meanwhile: gRPC's resolver
    waits longer after each lookup that failed (1 s, growing by 1.6 times to two minutes), and
    the gateway's calls, each a 503, waited with it: 5 s or more after the name came back, once
    it had been gone 9 s (38 s, once gone a minute). A channel whose calls all failed unsent for
    3 s is made afresh, its name looked up at once."""
    moving = orders_to_be_moved
    moving.old.stop(grace=None)
    moving.names.address = None
    moving.new.start()
    gone = time.monotonic()
    lookups_seen = moving.names.lookups

    def looked_up_in_vain_after_9_s() -> bool:
        nonlocal lookups_seen
        assert moving.orders_listed() == 503
        looked_up, lookups_seen = moving.names.lookups > lookups_seen, moving.names.lookups
        return looked_up and time.monotonic() - gone > 9

    # Back just after a lookup that failed: the resolver's wait till its next is by then 5 s or
    # more (the fifth failure's or a later one's: 6.5 s, give or take a fifth).
    wait_for(looked_up_in_vain_after_9_s, timeout=15, what="the name's lookups, failing",
             interval=0.1)
    moving.names.address = "127.0.0.3"
    wait_for(lambda: moving.orders_listed() == 200, timeout=4.5,
             what="a call answered once the name resolves again")


def test_a_service_whose_host_answers_nothing_is_503_within_a_second_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Its connections hang as they are made (its listen queue full, as a host gone silent or cut
    off drops them): unreachable, 503, once the 1 s connect timeout is up, over gRPC as over HTTP.
    gRPC's own connect timeout is 20 s: every call waited out its deadline, and was answered 504
    "may still have taken effect" though it was never sent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    target = f"127.0.0.1:{listener.getsockname()[1]}"
    queued = []  # connections the listener never accepts, until one can no longer be made
    try:
        while True:
            try:
                queued.append(socket.create_connection(listener.getsockname(), timeout=0.2))
            except OSError:
                break
        for transport in ("grpc", "http"):
            client = _gateway(settings, upstreams, grpc_targets, transport,
                              upstream_timeout_seconds=3.0, orders_service_url=f"http://{target}",
                              orders_grpc_target=target)
            _, auth = _signed_up_with_an_account(client)
            started = time.monotonic()
            answer = client.get("/api/orders", headers=auth)
            took = time.monotonic() - started
            assert answer.status_code == 503, (transport, answer.get_json())
            assert answer.get_json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert took < 2.0, f"{transport}: {took:.2f} s"  # (3 s, a 504, over gRPC before)
    finally:
        for connection in queued:
            connection.close()
        listener.close()


ORDERS = "/hseshop.orders.v1.Orders"
PAYMENTS = "/hseshop.payments.v1.Payments"


@pytest.mark.parametrize("metadata, code", [
    ((), "MISSING_USER_ID"),
    ((("x-user-id", "alice"),), "UNTRUSTED_IDENTITY"),
    (grpc_signed("alice", f"{ORDERS}/ListOrders", orders_pb2.ListOrdersRequest(),
                 secret="not the gateway's secret at all"), "UNTRUSTED_IDENTITY"),
    (grpc_signed("a b", f"{ORDERS}/ListOrders", orders_pb2.ListOrdersRequest()),
     "INVALID_USER_ID"),  # signed, malformed
])
def test_a_call_without_valid_gateway_metadata_is_refused_as_http_refuses_it(grpc_targets,
                                                                             metadata, code):
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListOrders(orders_pb2.ListOrdersRequest(), metadata=metadata, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers = dict(refused.value.trailing_metadata())
    assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == ("401", code)
    if code == "MISSING_USER_ID":  # (called directly: told to go through the gateway, as HTTP)
        assert refused.value.details() == CALL_THROUGH_THE_GATEWAY


def test_metadata_signed_for_one_call_is_refused_on_another(grpc_targets):
    """Captured off a balance read, the metadata vouches for that call alone: not for a deposit
    (another method), nor a deposit's for another amount (another message). It did for any."""
    from shared.protos import payments_pb2, payments_pb2_grpc

    user_id = f"bound-{uuid.uuid4().hex[:8]}"
    payments = payments_pb2_grpc.PaymentsStub(grpc.insecure_channel(grpc_targets["payments"]))
    opening, reading = payments_pb2.OpenAccountRequest(), payments_pb2.GetBalanceRequest()
    payments.OpenAccount(opening, timeout=5,
                         metadata=grpc_signed(user_id, f"{PAYMENTS}/OpenAccount", opening))
    read = grpc_signed(user_id, f"{PAYMENTS}/GetBalance", reading)
    assert payments.GetBalance(reading, metadata=read, timeout=5).balance == "0.00"  # its own
    deposit = payments_pb2.DepositRequest(amount="1.00")
    signed_deposit = grpc_signed(user_id, f"{PAYMENTS}/Deposit", deposit)
    for call in (lambda: payments.Deposit(deposit, metadata=read, timeout=5),
                 lambda: payments.OpenAccount(opening, metadata=read, timeout=5),  # (both empty)
                 lambda: payments.Deposit(payments_pb2.DepositRequest(amount="9999.00"),
                                          metadata=signed_deposit, timeout=5)):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == (
            "401", "UNTRUSTED_IDENTITY")
    assert payments.GetBalance(reading, metadata=read, timeout=5).balance == "0.00"
    assert payments.Deposit(deposit, metadata=signed_deposit, timeout=5).balance == "1.00"


def test_a_calls_metadata_is_joined_once_and_read_by_that_call_alone(grpc_targets, monkeypatch):
    """The access log's interceptor joins a call's metadata (shared.grpc_server._call_metadata)
    and the call is served with that, not joined again; calls served at once, each by a user of
    its own, are each answered for their own user (a call never reads another's metadata)."""
    from shared.protos import payments_pb2, payments_pb2_grpc

    joined, join = [], grpc_server._metadata_as_headers

    def counted(metadata):
        joined.append(metadata)
        return join(metadata)

    monkeypatch.setattr(grpc_server, "_metadata_as_headers", counted)
    payments = payments_pb2_grpc.PaymentsStub(grpc.insecure_channel(grpc_targets["payments"]))
    users = [f"own-{uuid.uuid4().hex[:8]}" for _ in range(2 * grpc_server.SERVER_THREADS)]
    opening = payments_pb2.OpenAccountRequest()

    def opened(user_id: str) -> str:
        return payments.OpenAccount(opening, timeout=10, metadata=grpc_signed(
            user_id, f"{PAYMENTS}/OpenAccount", opening)).user_id

    with futures.ThreadPoolExecutor(len(users)) as calling:
        assert list(calling.map(opened, users)) == users
    assert len(joined) == len(users)


def test_a_call_to_a_server_built_without_the_call_log_interceptor_is_internal_and_says_why(
        orders_flask_app, caplog):
    """serve_call reads the metadata CallLogInterceptor kept: a server built without it (not by
    build_server) answers every call INTERNAL, its log saying why, where a LookupError out of
    serve_call was answered UNKNOWN with a traceback naming a context variable."""
    from orders_app import grpc_api

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    grpc_api.register(server, orders_flask_app)
    bind = f"127.0.0.1:{free_port()}"
    assert server.add_insecure_port(bind) != 0
    server.start()
    place = orders_pb2.PlaceOrderRequest(amount="30.00", description="x")
    try:
        with grpc.insecure_channel(bind) as channel, pytest.raises(grpc.RpcError) as refused:
            orders = orders_pb2_grpc.OrdersStub(channel)
            orders.PlaceOrder(place, timeout=5,
                              metadata=grpc_signed("alice", f"{ORDERS}/PlaceOrder", place))
    finally:
        server.stop(grace=None)
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.INTERNAL, "The call was served without CallLogInterceptor.")
    said = [record for record in caplog.records if record.name == "shared.grpc_server"]
    assert [(record.levelno, record.getMessage().split(":")[0]) for record in said] == [
        (logging.ERROR, "a gRPC call served without CallLogInterceptor, which keeps the call's"
                        " metadata for serve_call")]


# A PlaceOrderRequest whose description (field 2) holds the byte 0xff: no UTF-8 string.
UNDECODABLE_PLACE_ORDER = b"\x0a\x0530.00\x12\x01\xff"


@pytest.mark.parametrize("signed, status, code", [
    (True, grpc.StatusCode.INVALID_ARGUMENT, ("400", "MALFORMED_REQUEST")),
    (False, grpc.StatusCode.UNAUTHENTICATED, ("401", "MISSING_USER_ID")),
])
def test_bytes_that_are_no_request_are_refused_as_http_refuses_a_body_it_cannot_read(
        grpc_targets, signed, status, code):
    """After the caller's identity, as the HTTP API checks it first too; gRPC's own parse
    answered INTERNAL, before any check."""
    call = grpc.insecure_channel(grpc_targets["orders"]).unary_unary(
        f"{ORDERS}/PlaceOrder")  # bytes in and out, as they are
    metadata = (grpc_signed("alice", f"{ORDERS}/PlaceOrder", UNDECODABLE_PLACE_ORDER) if signed
                else ())
    with pytest.raises(grpc.RpcError) as refused:
        call(UNDECODABLE_PLACE_ORDER, metadata=metadata, timeout=5)
    assert refused.value.code() == status
    trailers = dict(refused.value.trailing_metadata())
    assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == code


def test_an_amount_left_out_or_a_limit_out_of_range_is_refused_as_http_refuses_it(
        grpc_targets, orders_flask_app, payments_flask_app):
    """proto3 cannot tell an unset string from an empty one, unless the field is `optional`: the
    amount is, so that leaving it out is "Missing data", as over HTTP, not an invalid amount. A
    list's bad limit is filed under "query", as the HTTP API reads it there."""
    from shared.protos import payments_pb2, payments_pb2_grpc

    over_http = {
        "orders": orders_flask_app.test_client().post(
            "/orders", json={"description": "x"}, signed_as="alice"),
        "payments": payments_flask_app.test_client().post(
            "/accounts/deposit", json={}, signed_as="alice"),
    }
    place, deposit = orders_pb2.PlaceOrderRequest(description="x"), payments_pb2.DepositRequest()
    calls = {
        "orders": lambda: orders_pb2_grpc.OrdersStub(grpc.insecure_channel(
            grpc_targets["orders"])).PlaceOrder(
                place, metadata=grpc_signed("alice", f"{ORDERS}/PlaceOrder", place), timeout=5),
        "payments": lambda: payments_pb2_grpc.PaymentsStub(grpc.insecure_channel(
            grpc_targets["payments"])).Deposit(
                deposit, metadata=grpc_signed("alice", f"{PAYMENTS}/Deposit", deposit),
                timeout=5),
    }
    over_http["orders-list"] = orders_flask_app.test_client().get(
        "/orders?limit=0", signed_as="alice")
    listing = orders_pb2.ListOrdersRequest(limit=0)
    calls["orders-list"] = lambda: orders_pb2_grpc.OrdersStub(grpc.insecure_channel(
        grpc_targets["orders"])).ListOrders(
            listing, metadata=grpc_signed("alice", f"{ORDERS}/ListOrders", listing), timeout=5)
    for service, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        trailers = dict(refused.value.trailing_metadata())
        http_error = over_http[service].get_json()["error"]
        assert over_http[service].status_code == int(trailers[HTTP_STATUS_KEY]) == 422
        assert json.loads(trailers[ERROR_DETAILS_KEY]) == http_error["details"], service
    assert over_http["orders-list"].get_json()["error"]["details"] == {"query": {"limit": [
        "Must be greater than or equal to 1 and less than or equal to 200."]}}
    assert over_http["payments"].get_json()["error"]["details"] == {
        "json": {"amount": ["Missing data for required field."]}}


def test_an_amount_past_what_int_or_decimal_reads_is_refused_saying_why_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """The gateway reads the body as the services do, whichever transport reaches them: a 422
    naming the amount and why (too large, below 0, too many decimals), never a 400 "not valid
    JSON" or a 500; and a service called over gRPC with such an amount (a string: the field's
    type there) says the same."""
    for transport in ("grpc", "http"):
        gateway = _gateway(settings, upstreams, grpc_targets, transport)
        session = gateway.post("/api/auth/register", json={
            "username": f"past-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        auth = {"Authorization": f"Bearer {session['access_token']}"}
        assert gateway.post("/api/accounts", headers=auth).status_code == 201
        for written, reason in AMOUNTS_BEYOND_THE_READERS:
            for path in ("/api/orders", "/api/accounts/deposit"):
                answer = gateway.post(path, data=f'{{"amount": {written}}}',
                                      content_type="application/json", headers=auth)
                assert answer.status_code == 422, (transport, path, written[:30])
                assert answer.get_json()["error"]["details"] == {"json": {"amount": [reason]}}
        assert gateway.get("/api/orders", headers=auth).get_json()["items"] == []
        assert gateway.get("/api/accounts/balance", headers=auth).get_json()["balance"] == "0.00"
    place = orders_pb2.PlaceOrderRequest(amount="1e1000000000000000000")
    with pytest.raises(grpc.RpcError) as refused:
        orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"])).PlaceOrder(
            place, metadata=grpc_signed("alice", f"{ORDERS}/PlaceOrder", place), timeout=5)
    trailers = dict(refused.value.trailing_metadata())
    assert trailers[HTTP_STATUS_KEY] == "422"
    assert json.loads(trailers[ERROR_DETAILS_KEY]) == {
        "json": {"amount": ["must be at most 1000000000.00"]}}


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_cursor_is_read_as_base64url_alone_and_a_long_one_refused_as_its_schema_says(
        settings, upstreams, grpc_targets, transport):  # noqa: F811
    """A page's `next_cursor`, padded or not, reads the next page; any other spelling of it is
    400 INVALID_CURSOR: urlsafe_b64decode dropped characters outside its alphabet and took
    padding past a whole quantum, so that such a cursor read the page its own did. One over the
    500 characters the document's `maxLength` gives is a 422 VALIDATION_ERROR, as is any query
    outside its schema; the same over either transport."""
    gateway = _gateway(settings, upstreams, grpc_targets, transport)
    session = gateway.post("/api/auth/register", json={
        "username": f"cursor-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
    auth = {"Authorization": f"Bearer {session['access_token']}"}
    for amount in (1, 2):
        assert gateway.post("/api/orders", json={"amount": amount}, headers=auth).status_code == 202

    def page_after(cursor: str):
        return gateway.get("/api/orders", query_string={"limit": 1, "cursor": cursor},
                           headers=auth)

    given = gateway.get("/api/orders?limit=1", headers=auth).get_json()["next_cursor"]
    padded = given + "=" * (-len(given) % 4)
    next_page = page_after(given).get_json()
    assert [item["amount"] for item in next_page["items"]] == ["1.00"]
    assert page_after(padded).get_json() == next_page
    for respelled in (padded + "==", padded + "====", given[:4] + "...." + given[4:],
                      given[:4] + "!*!*" + given[4:], "A" * 500):
        refused = page_after(respelled)
        assert refused.status_code == 400, (respelled, refused.get_json())
        assert refused.get_json()["error"]["code"] == "INVALID_CURSOR"
    too_long = page_after("A" * 501)
    assert too_long.status_code == 422
    assert too_long.get_json()["error"]["details"] == {
        "query": {"cursor": ["Length must be between 1 and 500."]}}


@pytest.mark.parametrize("sent", ["", " ", " \t "])
def test_an_empty_idempotency_key_is_refused_by_each_service_as_over_http(
        grpc_targets, orders_flask_app, payments_flask_app, sent):
    """Sent but empty, the key is no key a retry could match: 400, over either transport (over
    gRPC the field is `optional`, so that an empty key sent is told from none). One of spaces and
    tabs alone is empty too: an HTTP server strips them from the header's ends (gunicorn hands
    the app ""), and over gRPC, where the field arrives as sent, it was taken as a key."""
    from shared.protos import payments_pb2, payments_pb2_grpc

    user_id, with_key = f"empty-key-{uuid.uuid4().hex[:8]}", {"Idempotency-Key": sent}
    over_http = [
        orders_flask_app.test_client().post("/orders", json={"amount": "1"}, signed_as=user_id,
                                            headers=with_key),
        payments_flask_app.test_client().post("/accounts/deposit", json={"amount": "1"},
                                              signed_as=user_id, headers=with_key),
    ]
    orders = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    payments = payments_pb2_grpc.PaymentsStub(grpc.insecure_channel(grpc_targets["payments"]))
    place = orders_pb2.PlaceOrderRequest(amount="1", idempotency_key=sent)
    deposit = payments_pb2.DepositRequest(amount="1", idempotency_key=sent)
    calls = [
        lambda: orders.PlaceOrder(place, timeout=5, metadata=grpc_signed(
            user_id, f"{ORDERS}/PlaceOrder", place)),
        lambda: payments.Deposit(deposit, timeout=5, metadata=grpc_signed(
            user_id, f"{PAYMENTS}/Deposit", deposit)),
    ]
    for response, call in zip(over_http, calls):
        assert response.status_code == 400
        assert response.get_json()["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"
        with pytest.raises(grpc.RpcError) as refused:
            call()
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == (
            "400", "INVALID_IDEMPOTENCY_KEY")
    orders_placed = orders_flask_app.test_client().get("/orders", signed_as=user_id)
    assert orders_placed.get_json()["items"] == []


def _stubs_of_a_user_with_an_account(grpc_targets, user: str) -> tuple:
    """Stubs of the orders and payments services, `user`'s account opened through the second."""
    from shared.protos import payments_pb2, payments_pb2_grpc

    orders = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    payments = payments_pb2_grpc.PaymentsStub(grpc.insecure_channel(grpc_targets["payments"]))
    opening = payments_pb2.OpenAccountRequest()
    payments.OpenAccount(opening, timeout=5,
                         metadata=grpc_signed(user, f"{PAYMENTS}/OpenAccount", opening))
    return orders, payments


def test_an_idempotency_key_is_the_same_key_without_the_spaces_and_tabs_at_its_ends_over_grpc(
        settings, grpc_targets, orders_flask_app, payments_flask_app):
    """" k" is the key "k" over gRPC as over HTTP, whose server strips a header's ends: a call
    under "k" retried under " k" and "k\t" (over gRPC, and over HTTP) is replayed, its first
    answer back, and the order placed once, the top-up deposited once. Over gRPC the field
    arrived as sent, " k" a key of its own: a second order, a second top-up."""
    from shared.grpc_server import REPLAYED_KEY
    from shared.idempotency import REPLAYED, REPLAYED_HEADER
    from shared.protos import payments_pb2

    user_id = f"spaced-key-{uuid.uuid4().hex[:8]}"
    orders, payments = _stubs_of_a_user_with_an_account(grpc_targets, user_id)
    for call, name, message, app, path in (
            (orders.PlaceOrder, f"{ORDERS}/PlaceOrder", orders_pb2.PlaceOrderRequest,
             orders_flask_app, "/orders"),
            (payments.Deposit, f"{PAYMENTS}/Deposit", payments_pb2.DepositRequest,
             payments_flask_app, "/accounts/deposit")):
        key = f"key-{uuid.uuid4().hex}"
        first = message(amount="10.00", idempotency_key=key)
        answer, answered = call.with_call(first, timeout=5,
                                          metadata=grpc_signed(user_id, name, first))
        assert REPLAYED_KEY not in dict(answered.trailing_metadata())
        for spaced in (f" {key}", f"{key}\t"):
            retry = message(amount="10.00", idempotency_key=spaced)
            again, replayed = call.with_call(retry, timeout=5,
                                             metadata=grpc_signed(user_id, name, retry))
            assert again == answer, (name, spaced)
            assert dict(replayed.trailing_metadata())[REPLAYED_KEY] == REPLAYED, (name, spaced)
        over_http = app.test_client().post(path, json={"amount": "10.00"}, signed_as=user_id,
                                           headers={"Idempotency-Key": f"\t{key} "})
        assert over_http.headers.get(REPLAYED_HEADER) == REPLAYED, path
    assert _orders_placed_by(settings, user_id) == 1
    balance = payments_pb2.GetBalanceRequest()
    assert payments.GetBalance(balance, timeout=5, metadata=grpc_signed(
        user_id, f"{PAYMENTS}/GetBalance", balance)).balance == "10.00"


def test_a_keyed_call_carried_out_and_repeated_past_its_deadline_is_answered_its_reply(
        settings, grpc_targets):
    """As over HTTP: a PlaceOrder or a Deposit carried out (its reply lost, say), repeated under
    its key with the signed deadline passed, commits nothing new and is answered the first reply,
    replayed in its trailers, where it was rolled back (DEADLINE_EXCEEDED, CALLER_GAVE_UP's
    trailers: "nothing of it was done", said by the gateway) with the order placed, the top-up
    made. A call under another key, new work, is still rolled back."""
    from shared.grpc_server import REPLAYED_KEY
    from shared.idempotency import REPLAYED
    from shared.protos import payments_pb2

    user = f"late-repeat-{uuid.uuid4().hex[:8]}"
    orders, payments = _stubs_of_a_user_with_an_account(grpc_targets, user)
    for call, name, message in (
            (orders.PlaceOrder, f"{ORDERS}/PlaceOrder", orders_pb2.PlaceOrderRequest),
            (payments.Deposit, f"{PAYMENTS}/Deposit", payments_pb2.DepositRequest)):
        key = f"key-{uuid.uuid4().hex}"
        request, fresh = (message(amount="1.00", idempotency_key=key),
                          message(amount="1.00", idempotency_key=f"{key}-2"))
        answer = call(request, timeout=5, metadata=grpc_signed(user, name, request))
        again, replayed = call.with_call(request, timeout=5, metadata=grpc_signed(
            user, name, request, deadline_seconds=-0.001))
        assert again == answer, name
        assert dict(replayed.trailing_metadata()).get(REPLAYED_KEY) == REPLAYED, name
        with pytest.raises(grpc.RpcError) as rolled_back:
            call(fresh, timeout=5, metadata=grpc_signed(user, name, fresh,
                                                        deadline_seconds=-0.001))
        assert rolled_back.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name
        assert dict(rolled_back.value.trailing_metadata())[ERROR_CODE_KEY] == "CALLER_GAVE_UP"
    assert _orders_placed_by(settings, user) == 1
    balance = payments_pb2.GetBalanceRequest()
    assert payments.GetBalance(balance, timeout=5, metadata=grpc_signed(
        user, f"{PAYMENTS}/GetBalance", balance)).balance == "1.00"


def _placed_while_held_up_past_its_deadline(settings, grpc_targets, user: str, metadata,
                                            place) -> None:
    """`place` called for `user` with `metadata` and a 0.5 s timeout while another session holds
    the user's placing lock (the call's own session waits on it), the lock given up once the
    call has been answered DEADLINE_EXCEEDED, and the call's transaction waited out."""
    import psycopg2

    from orders_app.service import PLACING_LOCK_CLASS
    from shared.db import driver_dsn

    dsn = driver_dsn(settings.database_url("orders"))
    holder, watcher = psycopg2.connect(dsn), psycopg2.connect(dsn)
    watcher.autocommit = True
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                           (PLACING_LOCK_CLASS, user))
        with pytest.raises(grpc.RpcError) as gave_up:
            stub.PlaceOrder(place, timeout=0.5, metadata=metadata)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with watcher.cursor() as cursor:
            def held_up_call():
                cursor.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND datname = current_database() AND pid <> %s"
                               " AND query LIKE '%%pg_advisory_xact_lock%%'",
                               (holder.info.backend_pid,))
                return cursor.fetchone()

            call = wait_for(held_up_call, timeout=5, interval=0.01,
                            what="the call's session waiting on the placing lock")
            holder.commit()  # (within the shop's 2 s lock limit): its INSERT goes through

            def call_ended() -> bool:
                cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", call)
                return cursor.fetchone() in (None, ("idle",))  # its transaction over, either way

            wait_for(call_ended, timeout=10, what="the held-up call's transaction to end")
    finally:
        holder.close()
        watcher.close()


def _orders_placed_by(settings, user: str) -> int:
    import psycopg2

    from shared.db import driver_dsn

    with psycopg2.connect(driver_dsn(settings.database_url("orders"))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM orders WHERE user_id = %s", (user,))
            return cursor.fetchone()[0]


def test_an_order_whose_caller_gave_up_by_its_deadline_is_not_placed(settings, grpc_targets,
                                                                     caplog):
    """The gateway gives a call its 5 s, then answers 504 and forgets it: a call held up past its
    deadline (here on the user's placing lock, held by another session) rolls back instead of
    placing an order the client was told had failed."""
    user, place = f"gave-up-{uuid.uuid4().hex[:8]}", orders_pb2.PlaceOrderRequest(amount="1")
    _placed_while_held_up_past_its_deadline(
        settings, grpc_targets, user, grpc_signed(user, f"{ORDERS}/PlaceOrder", place), place)
    assert _orders_placed_by(settings, user) == 0
    # Rolled back for its deadline, not for a lock it waited too long for.
    assert "the caller's deadline passed" in caplog.text


def test_a_captured_call_sent_again_with_a_longer_timeout_keeps_the_gateways_signed_deadline(
        settings, grpc_targets, caplog):
    """A PlaceOrder the gateway gave 0.5 s (signed into its metadata), held up past them on the
    user's placing lock and rolled back (the gateway's 504), captured and sent again within the
    signature's minute with a 30 s timeout: the service keeps to the earlier moment, the
    gateway's, and rolls it back too. It took the call's own timeout alone, which whoever sends
    the call sets, and placed the order after the gateway had answered 504. (Keyed: an unkeyed
    call's signature is taken once, so its repeat is refused before its deadline is read.)"""
    user = f"replayed-{uuid.uuid4().hex[:8]}"
    place = orders_pb2.PlaceOrderRequest(amount="1", idempotency_key=f"key-{uuid.uuid4().hex}")
    captured = grpc_signed(user, f"{ORDERS}/PlaceOrder", place, deadline_seconds=0.5)
    _placed_while_held_up_past_its_deadline(settings, grpc_targets, user, captured, place)
    assert _orders_placed_by(settings, user) == 0
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    caplog.clear()
    with pytest.raises(grpc.RpcError) as replayed:
        stub.PlaceOrder(place, timeout=30, metadata=captured)
    assert replayed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the caller's deadline passed" in caplog.text  # the service's rollback, not the timeout
    # Said in the trailers of the HTTP API's 504, as the service's other errors are: the gateway
    # tells its client nothing was done, which a bare DEADLINE_EXCEEDED (its own timer's) cannot.
    trailers = dict(replayed.value.trailing_metadata())
    assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY], trailers[ERROR_DETAILS_KEY]) == \
        ("504", "CALLER_GAVE_UP", "{}")
    assert _orders_placed_by(settings, user) == 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("work_ends, answered, placed", [
    (-0.2, 202, 1),  # its COMMIT begun before the deadline, ended after it: the service's 202
    (0.2, 504, 0),   # its deadline passed as its work ended: CALLER_GAVE_UP, nothing committed
], ids=["commit_straddling_the_deadline", "work_past_the_deadline_gave_up"])
def test_an_order_whose_commit_straddles_the_deadline_is_answered_as_it_ended(
        settings, upstreams, grpc_targets, monkeypatch,  # noqa: F811
        transport, work_ends, answered, placed):
    """An order whose work ends `work_ends` s from the gateway's 1 s deadline (as the service
    reads it), its COMMIT taking 0.6 s (commits_of_orders_taking): the gateway waits its
    COMMIT_GRACE_SECONDS past the deadline for the service's answer. Waiting to the deadline
    alone, a COMMIT begun 0.2 s before it was answered 504 "may still have taken effect" with
    the order placed, and a client retrying without an Idempotency-Key placed a second one. Work
    that ends past the deadline is rolled back, and the gateway says so, over either transport: a
    504 CALLER_GAVE_UP naming the service, nothing done (over gRPC from the service's trailers,
    which its DEADLINE_EXCEEDED carries), where it answered UPSTREAM_TIMEOUT "may still have taken
    effect", as for a service silent past the grace."""
    from orders_app import service
    from shared import db

    place_order = service.place_order

    def placed_at_its_moment(*args, **kwargs):
        time.sleep(max(0.0, db._caller_waits_until.get() + work_ends - time.monotonic()))
        return place_order(*args, **kwargs)

    client = _gateway(settings, upstreams, grpc_targets, transport, upstream_timeout_seconds=1.0)
    session, auth = _signed_up_with_an_account(client)
    monkeypatch.setattr(service, "place_order", placed_at_its_moment)
    with commits_of_orders_taking(settings.database_url("orders"), session["user_id"], 0.6):
        answer = client.post("/api/orders", json={"amount": "3.00"}, headers=auth)
    assert (answer.status_code, _orders_placed_by(settings, session["user_id"])) == \
        (answered, placed), answer.get_json()
    if answered == 504:
        error = answer.get_json()["error"]
        assert (error["code"], error["details"]) == ("CALLER_GAVE_UP", {"service": "orders"})
        assert "orders service" in error["message"] and "nothing of it was done" in \
            error["message"]


def test_a_captured_unkeyed_call_sent_again_is_refused_and_done_once(settings, grpc_targets):
    """A PlaceOrder or a Deposit without an idempotency_key, captured and sent again within its
    signature's minute, was carried out again (a second order, a second 10.00): its signature is
    taken once, as over HTTP (shared.single_use_signatures), the repeat refused UNAUTHENTICATED
    with the trailers of a 401 SIGNATURE_USED. A keyed call's repeat is still its first
    answer, and a read's repeat a read."""
    from shared.protos import payments_pb2

    user = f"captured-{uuid.uuid4().hex[:8]}"
    orders, payments = _stubs_of_a_user_with_an_account(grpc_targets, user)
    key = f"key-{uuid.uuid4().hex}"
    for call, name, request, repeat_refused in (
            (orders.PlaceOrder, f"{ORDERS}/PlaceOrder",
             orders_pb2.PlaceOrderRequest(amount="3", description="book"), True),
            (payments.Deposit, f"{PAYMENTS}/Deposit",
             payments_pb2.DepositRequest(amount="10.00"), True),
            (payments.Deposit, f"{PAYMENTS}/Deposit",
             payments_pb2.DepositRequest(amount="10.00", idempotency_key=key), False),
            (payments.GetBalance, f"{PAYMENTS}/GetBalance",
             payments_pb2.GetBalanceRequest(), False)):
        captured = grpc_signed(user, name, request)
        call(request, metadata=captured, timeout=5)
        if not repeat_refused:
            call(request, metadata=captured, timeout=5)
            continue
        with pytest.raises(grpc.RpcError) as refused:
            call(request, metadata=captured, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == \
            ("401", "SIGNATURE_USED")
        assert "used before" in refused.value.details()
    balance = payments_pb2.GetBalanceRequest()
    assert payments.GetBalance(balance, timeout=5, metadata=grpc_signed(
        user, f"{PAYMENTS}/GetBalance", balance)).balance == "20.00"
    assert _orders_placed_by(settings, user) == 1


def test_an_unauthenticated_call_with_a_deadline_long_past_logs_nothing_of_it(grpc_targets,
                                                                            caplog):
    """The deadline is read once the call's identity is verified: anyone's call with a moment
    long past, unsigned or signed by no gateway, had the service log that a request came so long
    after its caller's deadline (its clocks and the caller's disagreeing), a line of the caller's
    making."""
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    listing = orders_pb2.ListOrdersRequest()
    past = (("x-gateway-deadline", f"{time.time() - 3600:.3f}"),)
    forged = tuple((name, value) for name, value in grpc_signed(
        f"deadline-{uuid.uuid4().hex[:8]}", f"{ORDERS}/ListOrders", listing, "not the secret")
        if name != "x-gateway-deadline") + past
    for metadata in (past, forged):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListOrders(listing, metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "caller's deadline" not in caplog.text


def test_a_call_without_its_signed_deadline_or_with_another_is_refused(grpc_targets):
    """The gateway's deadline is signed with the call (shared.internal_auth): left out, the call
    is held to nothing but a timeout whoever sends it sets; changed, a later one is not the
    gateway's. Both 401 UNTRUSTED_IDENTITY, as a forged signature."""
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    listing = orders_pb2.ListOrdersRequest()
    signed = grpc_signed(f"deadline-{uuid.uuid4().hex[:8]}", f"{ORDERS}/ListOrders", listing,
                         deadline_seconds=5)
    assert stub.ListOrders(listing, metadata=signed, timeout=5).items == []
    deadline = dict(signed)["x-gateway-deadline"]
    without = tuple((name, value) for name, value in signed if name != "x-gateway-deadline")
    later = tuple((name, f"{float(deadline) + 30:.3f}" if name == "x-gateway-deadline" else value)
                  for name, value in signed)
    for metadata, message in ((without, "no gateway-signed deadline"),
                              (later, "not the gateway's for this request")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListOrders(listing, metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in refused.value.details()
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == (
            "401", "UNTRUSTED_IDENTITY")


def test_a_call_without_its_nonce_with_another_or_with_it_twice_is_refused(grpc_targets,
                                                                           settings):
    """Each call the gateway signs carries a nonce of its own (x-gateway-nonce), signed: left
    out, the signature would be checked as one made without it (one for two orders alike again);
    another, or one given twice (read joined by a comma, as over HTTP), is not the gateway's.
    Each 401 UNTRUSTED_IDENTITY, and nothing placed."""
    user = f"nonce-{uuid.uuid4().hex[:8]}"
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    name, place = f"{ORDERS}/PlaceOrder", orders_pb2.PlaceOrderRequest(amount="1")
    signed = grpc_signed(user, name, place)
    nonce = dict(signed)["x-gateway-nonce"]
    without = tuple(item for item in signed if item[0] != "x-gateway-nonce")
    for metadata, message in (
            (without, "no gateway nonce"),
            ((*without, ("x-gateway-nonce", "0" * 32)), "not the gateway's for this request"),
            ((*signed, ("x-gateway-nonce", nonce)), "nonce is not 32 hex digits")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.PlaceOrder(place, metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, message
        assert message in refused.value.details()
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == (
            "401", "UNTRUSTED_IDENTITY")
    assert _orders_placed_by(settings, user) == 0


@pytest.mark.parametrize("given", MALFORMED_DEADLINES_IN_METADATA.values(),
                         ids=MALFORMED_DEADLINES_IN_METADATA)
def test_a_signed_deadline_of_no_documented_form_is_refused_as_over_http(grpc_targets, settings,
                                                                        given):
    """As over HTTP: a deadline the gateway signed that is of no documented form is refused
    INVALID_ARGUMENT with the trailers of a 400 INVALID_DEADLINE, after the signature (a
    deadline not the one signed is a 401), and nothing is done. It was taken as none, the call
    held to its own timeout alone, which nobody signs; an empty one was refused as missing."""
    user = f"malformed-{uuid.uuid4().hex[:8]}"
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    secret = settings.internal_auth_secret
    for call, name, request in ((stub.PlaceOrder, f"{ORDERS}/PlaceOrder",
                                 orders_pb2.PlaceOrderRequest(amount="1")),
                                (stub.ListOrders, f"{ORDERS}/ListOrders",
                                 orders_pb2.ListOrdersRequest())):
        signed = grpc_identity_metadata(user, secret, name, request.SerializeToString(), given)
        signed_for_another = [(key, given if key == DEADLINE_HEADER.lower() else value)
                              for key, value in grpc_signed(user, name, request)]
        for metadata, status, code in (
                (signed, grpc.StatusCode.INVALID_ARGUMENT, ("400", "INVALID_DEADLINE")),
                (signed_for_another, grpc.StatusCode.UNAUTHENTICATED,
                 ("401", "UNTRUSTED_IDENTITY"))):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, metadata=metadata, timeout=5)
            assert refused.value.code() == status, (name, refused.value.details())
            trailers = dict(refused.value.trailing_metadata())
            assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == code, name
    assert _orders_placed_by(settings, user) == 0


def test_a_deadline_given_twice_in_a_calls_metadata_is_read_joined_as_over_http(grpc_targets,
                                                                              settings):
    """As over HTTP, where the header given twice reaches the service joined by a comma: the
    values joined are what the signature is checked against and the deadline read from. Signed as
    they arrive joined (the gateway's alone could), 400 INVALID_DEADLINE; a call signed for one
    deadline with an unsigned one added, in front or behind, a 401 as any metadata tampered with
    (the last value alone was checked: one added in front passed, and was then read joined, a
    400). Nothing done either way."""
    user = f"twice-{uuid.uuid4().hex[:8]}"
    stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(grpc_targets["orders"]))
    name, place = f"{ORDERS}/PlaceOrder", orders_pb2.PlaceOrderRequest(amount="1")
    key = DEADLINE_HEADER.lower()
    first, second = (f"{time.time() + seconds:.6f}" for seconds in (30, 60))
    signed_joined = [item for item in grpc_identity_metadata(
        user, settings.internal_auth_secret, name, place.SerializeToString(), f"{first},{second}")
        if item[0] != key]
    signed_for_one = grpc_signed(user, name, place)
    for metadata, status, code in (
            ((*signed_joined, (key, first), (key, second)), grpc.StatusCode.INVALID_ARGUMENT,
             ("400", "INVALID_DEADLINE")),
            (((key, "junk"), *signed_for_one), grpc.StatusCode.UNAUTHENTICATED,
             ("401", "UNTRUSTED_IDENTITY")),
            ((*signed_for_one, (key, "junk")), grpc.StatusCode.UNAUTHENTICATED,
             ("401", "UNTRUSTED_IDENTITY"))):
        with pytest.raises(grpc.RpcError) as refused:
            stub.PlaceOrder(place, metadata=metadata, timeout=5)
        assert refused.value.code() == status, (metadata, refused.value.details())
        trailers = dict(refused.value.trailing_metadata())
        assert (trailers[HTTP_STATUS_KEY], trailers[ERROR_CODE_KEY]) == code, metadata
    assert _orders_placed_by(settings, user) == 0


def test_a_calls_access_log_line_holds_no_line_break_nor_an_id_that_is_not_sane(grpc_targets):
    """As the HTTP access log: a method with a line break in it (logged as the call arrives, before
    any check) wrote a line of the caller's making, and an id of any length was bound to it. An
    id given twice is joined by a comma, as over HTTP, and so no sane id (the last was taken)."""
    said = []

    class _Said(logging.Handler):
        def emit(self, record):
            said.append((record.getMessage(), current_request_id()))

    logger = logging.getLogger(grpc_server.__name__)
    handler, level = _Said(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        channel = grpc.insecure_channel(grpc_targets["orders"])
        forged = "2026-01-01 00:00:00,000 INFO orders [request_id=-] a line of the caller's"
        for method, request_ids in ((f"/x\n{forged}", ("r" * 300,)), ("/\x1b[2Jx", ("sane-id-1",)),
                                    ("/twice", ("sane-id-1", "sane-id-2"))):
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(method)(
                    b"", metadata=tuple(("x-request-id", given) for given in request_ids),
                    timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert said == [(f"gRPC /x\\x0a{forged}", None), ("gRPC /\\x1b[2Jx", "sane-id-1"),
                    ("gRPC /twice", None)]


def test_server_reflection_lists_each_service(grpc_targets):
    for target, name in ((grpc_targets["orders"], "hseshop.orders.v1.Orders"),
                         (grpc_targets["payments"], "hseshop.payments.v1.Payments")):
        database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(target))
        assert name in database.get_services()
        assert database.FindFileContainingSymbol(name) is not None


def _signed_call_headers(user_id: str, method: str, json_request: str) -> tuple[list, str]:
    """What `python -m shared.grpc_signed_call_headers` prints for the call, read as grpcurl reads
    it: the metadata of its -H flags (each "name: value", split at the first colon, both ends
    stripped) and the JSON of its -d."""
    printed = subprocess.run(
        [sys.executable, "-m", "shared.grpc_signed_call_headers", user_id, method, "-d",
         json_request], cwd=REPO_ROOT, env=os.environ, capture_output=True, text=True, check=True)
    words = shlex.split(printed.stdout)
    flags = list(zip(words[::2], words[1::2], strict=True))
    metadata = [tuple(part.strip() for part in value.split(":", 1))
                for flag, value in flags if flag == "-H"]
    assert [flag for flag, _ in flags] == ["-H"] * len(metadata) + ["-d"], printed.stdout
    return metadata, flags[-1][1]


def _called_as_a_stock_client(target: str, method: str, json_request: str, metadata=()):
    """`method` ("package.Service/Method") called as grpcurl calls it: no generated code, its
    request and reply types read off the server's reflection, the request built from
    `json_request`; the reply as JSON."""
    channel = grpc.insecure_channel(target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service, name = method.split("/")
    described = pool.FindServiceByName(service).methods_by_name[name]
    request = json_format.Parse(json_request, GetMessageClass(described.input_type)())
    call = channel.unary_unary(f"/{method}", request_serializer=type(request).SerializeToString,
                               response_deserializer=GetMessageClass(
                                   described.output_type).FromString)
    return json_format.MessageToDict(call(request, metadata=metadata, timeout=5),
                                     preserving_proto_field_name=True)


def _refused_to_a_stock_client(target: str, method: str, json_request: str, metadata=()) -> str:
    """The error code a call made as _called_as_a_stock_client makes it is refused with, a 401's."""
    with pytest.raises(grpc.RpcError) as refused:
        _called_as_a_stock_client(target, method, json_request, metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers = dict(refused.value.trailing_metadata())
    assert trailers[HTTP_STATUS_KEY] == "401"
    return trailers[ERROR_CODE_KEY]


def test_a_stock_client_calls_a_service_with_the_headers_the_operators_command_signs(
        grpc_targets):
    """grpcurl, given the -H flags and -d that `python -m shared.grpc_signed_call_headers` prints
    for a call, makes it: the command signs the bytes grpcurl makes of that JSON. Nothing made
    the gateway's metadata for an operator, and no stock client could call a service. The
    metadata is good for that call alone: not for another request (a tampered amount), and an
    unkeyed write's not twice; a call without it is refused."""
    user = f"operator-{uuid.uuid4().hex[:8]}"
    payments, orders = grpc_targets["payments"], grpc_targets["orders"]
    opening, deposit = "hseshop.payments.v1.Payments/OpenAccount", \
        "hseshop.payments.v1.Payments/Deposit"
    balance = "hseshop.payments.v1.Payments/GetBalance"

    def signed_call(target: str, method: str, json_request: str) -> dict:
        metadata, signed_json = _signed_call_headers(user, method, json_request)
        return _called_as_a_stock_client(target, method, signed_json, metadata)

    assert signed_call(payments, opening, "{}") == {"user_id": user, "balance": "0.00"}
    metadata, signed_json = _signed_call_headers(user, deposit, '{"amount": "5.00"}')
    assert _refused_to_a_stock_client(payments, deposit, '{"amount": "500.00"}',
                                      metadata) == "UNTRUSTED_IDENTITY"
    assert _called_as_a_stock_client(payments, deposit, signed_json, metadata)["balance"] == "5.00"
    assert _refused_to_a_stock_client(payments, deposit, signed_json,
                                      metadata) == "SIGNATURE_USED"
    assert _refused_to_a_stock_client(payments, balance, "{}") == "MISSING_USER_ID"
    assert signed_call(payments, balance, "{}") == {"user_id": user, "balance": "5.00"}
    placed = signed_call(orders, "hseshop.orders.v1.Orders/PlaceOrder",
                         '{"amount": "3", "description": "a book"}')
    assert (placed["user_id"], placed["amount"], placed["status"]) == (user, "3.00", "NEW")
    page = signed_call(orders, "hseshop.orders.v1.Orders/ListOrders", '{"limit": 5}')
    assert [order["id"] for order in page["items"]] == [placed["id"]]


def test_the_generated_grpc_code_is_current(tmp_path):
    protos = sorted((REPO_ROOT / "shared" / "protos").glob("*.proto"))
    for proto in protos:
        (tmp_path / "shared" / "protos").mkdir(parents=True, exist_ok=True)
        (tmp_path / "shared" / "protos" / proto.name).write_bytes(proto.read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", "--pyi_out=.",
                    *[f"shared/protos/{p.name}" for p in protos]], cwd=tmp_path, check=True)
    for generated in (tmp_path / "shared" / "protos").glob("*_pb2*"):
        committed = REPO_ROOT / "shared" / "protos" / generated.name
        assert committed.read_bytes() == generated.read_bytes(), \
            f"{committed.name} is stale: run `make protos`"


def test_with_its_database_unreachable_a_grpc_service_answers_503(settings):
    import orders_app
    from shared.grpc_server import ERROR_CODE_KEY, HTTP_STATUS_KEY

    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    app = orders_app.create_app(settings=dataclasses.replace(settings,
                                                             orders_database_url=unreachable))
    bind = f"127.0.0.1:{free_port()}"
    server = build_server("orders", app, bind)
    server.start()
    try:
        stub = orders_pb2_grpc.OrdersStub(grpc.insecure_channel(bind))
        metadata = grpc_signed("alice", f"{ORDERS}/ListOrders", orders_pb2.ListOrdersRequest(),
                               settings.internal_auth_secret)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListOrders(orders_pb2.ListOrdersRequest(), metadata=metadata, timeout=10)
        trailers = dict(refused.value.trailing_metadata())
        assert trailers[HTTP_STATUS_KEY] == "503"
        assert trailers[ERROR_CODE_KEY] == "DATABASE_UNAVAILABLE"
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # a retryable status
    finally:
        server.stop(grace=None)


def _orders_list_over_both_transports(settings, upstreams, grpc_targets,  # noqa: F811
                                      orders, method: str = "GET") -> dict[str, object]:
    """A new shopper's GET (or `method`) /api/orders through a gateway over each transport to
    `orders` (an orders app served here over HTTP and gRPC both): the answers by transport."""
    from tests.integration.test_gateway import _Served

    over_http = _Served(make_server("127.0.0.1", 0, orders, threaded=True))
    bind = f"127.0.0.1:{free_port()}"
    over_grpc = build_server("orders", orders, bind)
    over_grpc.start()
    answers = {}
    try:
        for transport in ("grpc", "http"):
            client = _gateway(settings, upstreams, grpc_targets, transport,
                              orders_service_url=over_http.url, orders_grpc_target=bind)
            session = client.post("/api/auth/register", json={
                "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
            answers[transport] = client.open(
                "/api/orders", method=method,
                headers={"Authorization": f"Bearer {session['access_token']}"})
    finally:
        over_grpc.stop(grace=None)
        over_http.close()
    return answers


def test_a_service_without_its_database_is_503_with_retry_after_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """The service's own answer (DATABASE_UNAVAILABLE, try again in a second) reaches the caller
    through the gateway as it is, whichever transport carries it."""
    answers = _orders_list_over_both_transports(settings, upstreams, grpc_targets,
                                                _orders_without_a_database(settings))
    for transport, answer in answers.items():
        assert answer.status_code == 503, transport
        assert answer.get_json()["error"]["code"] == "DATABASE_UNAVAILABLE", transport
        assert answer.headers.get("Retry-After") == "1", transport


def test_a_head_to_a_service_without_its_database_is_its_gets_503_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Status, Retry-After and length, without the body: over HTTP it was a 502, the service's
    own 503 not told from a failure, its HEAD answer having no body to say which it was."""
    orders = _orders_without_a_database(settings)
    got = _orders_list_over_both_transports(settings, upstreams, grpc_targets, orders)
    for transport, head in _orders_list_over_both_transports(
            settings, upstreams, grpc_targets, orders, method="HEAD").items():
        assert (head.status_code, head.data) == (503, b""), transport
        assert head.headers.get("Retry-After") == "1", transport
        assert head.headers["Content-Length"] == str(len(got[transport].data)), transport


def _orders_without_a_database(settings):
    """An orders app whose database cannot be reached."""
    import orders_app

    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    return orders_app.create_app(settings=dataclasses.replace(settings,
                                                              orders_database_url=unreachable))


def test_a_gateway_whose_signature_the_services_refuse_answers_502_not_401(
        settings, upstreams, grpc_targets, caplog):  # noqa: F811
    """A gateway signing with another INTERNAL_AUTH_SECRET than the services': the caller's token
    is good, so the caller is not told otherwise (a 401 signs the page out); the operator is told
    what to look at."""
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport,
                          internal_auth_secret="not the services' secret")
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        answer = client.get("/api/accounts/balance",
                            headers={"Authorization": f"Bearer {session['access_token']}"})
        assert answer.status_code == 502, (transport, answer.get_json())
        assert answer.get_json()["error"]["code"] == "BAD_GATEWAY", transport
        assert "INTERNAL_AUTH_SECRET" in caplog.text, transport
        caplog.clear()


def test_a_gateways_two_unkeyed_writes_alike_signed_at_one_moment_are_both_carried_out(
        settings, upstreams, grpc_targets, caplog, monkeypatch):  # noqa: F811
    """Two orders alike without an Idempotency-Key, signed in one microsecond (the gateway's
    clock held still here, as two gateway processes may both read it) were one signature, which
    the service took once: the second was refused 401 SIGNATURE_USED, a 502 to the shopper. Each
    is signed with a nonce of its own now, and both are placed, over either transport. Were two
    of them alike all the same (the nonce held too, as a replay is), the second is a 502 and the
    gateway's log says what happened, not that the release, INTERNAL_AUTH_SECRET or the clocks
    are apart."""
    held = types.SimpleNamespace(time=lambda now=time.time(): now, monotonic=time.monotonic)
    for module in ("shared.internal_auth", "shared.caller_deadline"):
        monkeypatch.setattr(f"{module}.time", held)
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        session, auth = _signed_up_with_an_account(client)
        answers = [client.post("/api/orders", json={"amount": "2.00"}, headers=auth)
                   for _ in range(2)]
        assert [answer.status_code for answer in answers] == [202, 202], (
            transport, [answer.get_json() for answer in answers])
        assert _orders_placed_by(settings, session["user_id"]) == 2, transport
    monkeypatch.setattr("shared.internal_auth.secrets",
                        types.SimpleNamespace(token_hex=lambda size: "ab" * size))
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        caplog.clear()
        answers = [client.post("/api/orders", json={"amount": "2.00"}, headers=auth)
                   for _ in range(2)]
        assert answers[0].status_code == 202, (transport, answers[0].get_json())
        assert answers[1].status_code == 502, (transport, answers[1].get_json())
        assert answers[1].get_json()["error"]["code"] == "BAD_GATEWAY", transport
        assert "an unkeyed write's signature was used twice" in caplog.text, transport
        assert "INTERNAL_AUTH_SECRET" not in caplog.text, transport


def _signed_up_with_an_account(client) -> tuple[dict, dict[str, str]]:
    """A new user signed up through the gateway, with an account: the session and its header."""
    session = client.post("/api/auth/register", json={
        "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
    auth = {"Authorization": f"Bearer {session['access_token']}"}
    assert client.post("/api/accounts", headers=auth).status_code == 201
    return session, auth


def test_a_head_is_answered_with_its_gets_headers_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Its length among them, as the service answers it: over HTTP the gateway's answer, built
    from the service's empty body, said Content-Length: 0."""
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path in ("/api/accounts/balance", "/api/orders", f"/api/orders/{uuid.uuid4()}"):
            got, head = client.get(path, headers=auth), client.head(path, headers=auth)
            assert (head.status_code, head.data) == (got.status_code, b""), (transport, path)
            assert head.headers["Content-Length"] == str(len(got.data)), (transport, path)
            assert head.headers["Content-Type"] == got.headers["Content-Type"], (transport, path)


def test_what_a_post_made_is_answered_with_where_it_is_read_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """An order placed (202) and an account opened (201) say in Location the gateway's path that
    reads them (RFC 9110, 10.2.2), a replay as the first answer did, as documented; an error
    says none. The body and status as they were: none said it."""
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        spec = client.get("/docs/openapi.json").get_json()
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        auth = {"Authorization": f"Bearer {session['access_token']}"}
        keyed = {**auth, "Idempotency-Key": str(uuid.uuid4())}
        opened = client.post("/api/accounts", headers=auth)
        placed = [client.post("/api/orders", json={"amount": "5", "description": "pen"},
                              headers=keyed) for _ in range(2)]
        assert REPLAYED_HEADER in placed[1].headers, transport
        for (method, path), answer, status, where in (
                (("post", "/api/accounts"), opened, 201, "/api/accounts/balance"),
                *((("post", "/api/orders"), each, 202, f"/api/orders/{placed[0].get_json()['id']}")
                  for each in placed)):
            assert (answer.status_code, answer.headers.get("Location")) == (status, where), (
                transport, path)
            read = client.get(answer.headers["Location"], headers=auth)
            assert (read.status_code, read.get_json()) == (200, answer.get_json()), transport
            assert "Location" in spec["paths"][path][method]["responses"][str(status)]["headers"]
            assert_headers_documented(spec, method, path, answer)
        refused = [client.post("/api/accounts", headers=auth),
                   client.post("/api/orders", json={"amount": "-1"}, headers=auth)]
        assert [(answer.status_code, answer.headers.get("Location")) for answer in refused] == [
            (409, None), (422, None)], transport


# A body of each route that takes one, as JSON, and what its route answers it sent as such.
_JSON_BODIES = {"/api/auth/login": ('{"username": "nobody-here", "password": "long password"}',
                                    401),
                "/api/accounts": ("{}", 409),
                "/api/accounts/deposit": ('{"amount": "5"}', 200),
                "/api/orders": ('{"amount": "5", "description": "pen"}', 202),
                "/api/notifications/tickets": ("{}", 201)}


def test_a_body_that_is_not_json_is_a_415_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """The fields sent as a form, as text/plain or with no Content-Type are refused as a body of
    a type the route does not take, the same over either transport: they were passed over as if
    no body were sent, a 422 saying each required field was missing (the client had sent them),
    or a 201 for an account whose form was ignored. A route answers as before without a body."""
    answers = {}
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path, (body, status) in _JSON_BODIES.items():
            for content_type in ("text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", None):
                refused = client.post(path, data=body, content_type=content_type, headers=auth)
                assert refused.status_code == 415, (transport, path, content_type,
                                                    refused.get_json())
                assert refused.get_json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
                answers.setdefault((path, content_type), []).append(refused.get_json())
            taken = client.post(path, data=body, content_type="application/json", headers=auth)
            assert taken.status_code == status, (transport, path, taken.get_json())
        assert client.post("/api/orders", headers=auth).get_json()["error"]["details"] == {
            "json": {"amount": ["Missing data for required field."]}}, transport
    assert all(over_grpc == over_http for over_grpc, over_http in answers.values())


def test_a_body_in_a_content_coding_is_a_415_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Refused by the gateway as by the services (no coding is read), the same over either
    transport: a body said to be gzipped was read as it came, carried out when it was not
    gzipped (an order placed), "not valid JSON" when it was."""
    answers = {}
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path, (body, _status) in _JSON_BODIES.items():
            for sent in (body.encode(), gzip.compress(body.encode(), mtime=0)):
                refused = client.post(path, data=sent, content_type="application/json",
                                      headers={**auth, "Content-Encoding": "gzip"})
                assert refused.status_code == 415, (transport, path, refused.get_json())
                assert refused.headers["Accept-Encoding"] == "identity"
                answers.setdefault((path, sent), []).append(refused.get_json())
        assert client.get("/api/orders", headers=auth).get_json()["items"] == [], transport
        assert client.get("/api/accounts/balance", headers=auth).get_json()["balance"] == "0.00"
    assert all(over_grpc == over_http for over_grpc, over_http in answers.values())


def test_a_query_parameter_given_more_than_once_is_a_422_naming_it_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Whichever value comes first (`?limit=1&limit=x` was a page of one, `?limit=x&limit=1` a
    422): refused as the services refuse it, the same over either transport."""
    answers = {}
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path, details in (
                ("/api/orders?limit=1&limit=x", {"limit": ["Given more than once."]}),
                # (read on its first value, with what is wrong with that)
                ("/api/orders?limit=x&limit=1",
                 {"limit": ["Not a valid integer.", "Given more than once."]}),
                ("/api/orders?cursor=a&limit=5&cursor=b", {"cursor": ["Given more than once."]}),
                ("/api/notifications?after=0&after=1", {"after": ["Given more than once."]})):
            answer = client.get(path, headers=auth)
            assert answer.status_code == 422, (transport, path, answer.get_json())
            assert answer.get_json()["error"]["code"] == "VALIDATION_ERROR", (transport, path)
            assert answer.get_json()["error"]["details"] == {"query": details}, (transport, path)
            answers.setdefault(path, []).append(answer.get_json())
    assert all(over_grpc == over_http for over_grpc, over_http in answers.values())


def test_a_body_giving_a_name_more_than_once_is_a_422_naming_it_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Whichever value comes first (`{"amount": "1", "amount": "900"}` was an order of 900.00, as
    Python's json reads it, where a proxy's reader may take the first): refused as a query
    parameter given twice is, by the gateway's own routes too, the same over either transport,
    and nothing is done."""
    answers = {}
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path, body, details in (
                ("/api/orders", '{"amount": "1", "description": "a", "amount": "900"}',
                 {"amount": ["Given more than once."]}),
                ("/api/accounts/deposit", '{"amount": "900", "amount": "1"}',
                 {"amount": ["Given more than once."]}),
                ("/api/auth/login", '{"username": "a", "password": "12345678", "username": "b"}',
                 {"username": ["Given more than once."]}),
                # (a repeat in an object within, at its path: no field `p` is taken)
                ("/api/auth/login", '{"username": "a", "password": {"p": 1, "p": 2}}',
                 {"password": ["Not a valid string."], "password.p": ["Given more than once."]})):
            answer = client.post(path, data=body, content_type="application/json", headers=auth)
            assert answer.status_code == 422, (transport, path, answer.get_json())
            assert answer.get_json()["error"]["details"] == {"json": details}, (transport, body)
            answers.setdefault(body, []).append(answer.get_json())
        assert client.get("/api/orders", headers=auth).get_json()["items"] == [], transport
        assert client.get("/api/accounts/balance", headers=auth).get_json()["balance"] == "0.00"
    assert all(over_grpc == over_http for over_grpc, over_http in answers.values())


def test_an_options_is_a_204_that_says_which_methods_the_path_takes_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Answered by the gateway itself, as a JSON API answers it: no content, so no text/html type
    (Flask's own: a 200 with an empty text/html body), and Allow as a 405's. (Signed in: an
    OPTIONS under /api is checked as any request there.)"""
    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        _, auth = _signed_up_with_an_account(client)
        for path, allowed in (("/api/orders", "GET, HEAD, OPTIONS, POST"),
                              (f"/api/orders/{uuid.uuid4()}", "GET, HEAD, OPTIONS"),
                              ("/api/accounts", "OPTIONS, POST"),
                              ("/api/accounts/deposit", "OPTIONS, POST"),
                              ("/api/accounts/balance", "GET, HEAD, OPTIONS"),
                              ("/api/notifications", "GET, HEAD, OPTIONS"),
                              ("/api/auth/login", "OPTIONS, POST"),
                              ("/health", "GET, HEAD, OPTIONS"),
                              ("/docs/openapi.json", "GET, HEAD, OPTIONS"),
                              ("/", "GET, HEAD, OPTIONS")):
            answer = client.options(path, headers=auth)
            assert (answer.status_code, answer.data) == (204, b""), (transport, path)
            assert "Content-Type" not in answer.headers, (transport, path)
            assert answer.headers["Allow"] == allowed, (
                transport, path)


def test_a_request_held_up_by_a_lock_is_503_busy_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """A deposit held up by a stalled transaction on its account (shared.db.SESSION_LIMITS)
    reaches the caller through the gateway as the service's DATABASE_BUSY, inside the gateway's
    own wait for the service, whichever transport carries it."""
    from tests.postgres_tools import account_row_held

    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        session, auth = _signed_up_with_an_account(client)
        with account_row_held(settings.database_url("payments"), session["user_id"]):
            answer = client.post("/api/accounts/deposit", json={"amount": "5"}, headers=auth)
        assert answer.status_code == 503, transport
        assert answer.get_json()["error"]["code"] == "DATABASE_BUSY", transport
        assert answer.headers.get("Retry-After") == "1", transport
        assert client.get("/api/accounts/balance", headers=auth).get_json()["balance"] == "0.00"


def test_a_keyed_request_held_up_by_an_earlier_one_is_503_key_in_use_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """A deposit whose Idempotency-Key an earlier request under it holds, under way still (its
    key recorded, uncommitted), past lock_timeout reaches the caller through the gateway as the
    service's 503 IDEMPOTENCY_KEY_IN_USE with Retry-After, whichever transport carries it: not
    DATABASE_BUSY's "nothing was changed", the earlier one may yet take effect."""
    from tests.postgres_tools import key_row_held

    for transport in ("grpc", "http"):
        client = _gateway(settings, upstreams, grpc_targets, transport)
        session, auth = _signed_up_with_an_account(client)
        key = str(uuid.uuid4())
        with key_row_held(settings.database_url("payments"), session["user_id"],
                          "POST /accounts/deposit", key):
            answer = client.post("/api/accounts/deposit", json={"amount": "5"},
                                 headers={**auth, "Idempotency-Key": key})
        assert answer.status_code == 503, transport
        assert answer.get_json()["error"]["code"] == "IDEMPOTENCY_KEY_IN_USE", transport
        assert answer.headers.get("Retry-After") == "1", transport
        retried = client.post("/api/accounts/deposit", json={"amount": "5"},
                              headers={**auth, "Idempotency-Key": key})
        assert retried.get_json()["balance"] == "5.00", transport


def test_a_service_whose_pool_has_no_connection_free_is_503_busy_over_both_transports(
        settings, upstreams, grpc_targets):  # noqa: F811
    """Nothing ran, as for a lock waited on too long: DATABASE_BUSY with Retry-After, where it was
    a 500 (a 502 through the gateway, which says the request may have been carried out)."""
    import orders_app

    app = orders_app.create_app(settings=settings)
    with no_connection_free(app):
        answers = _orders_list_over_both_transports(settings, upstreams, grpc_targets, app)
    for transport, answer in answers.items():
        assert answer.status_code == 503, transport
        assert answer.get_json()["error"]["code"] == "DATABASE_BUSY", transport
        assert answer.headers.get("Retry-After") == "1", transport


class _FailingAsTold(orders_pb2_grpc.OrdersServicer):
    """Fails every ListOrders and GetOrder with the trailers it is told (`trailers`), as a service
    of another release, or something else at its address, might."""

    trailers: tuple[tuple[str, str], ...] = ()

    def ListOrders(self, request, context):
        context.set_trailing_metadata(self.trailers)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "as told")

    GetOrder = ListOrders


class _AnsweringAsTold(http.server.BaseHTTPRequestHandler):
    """Answers every GET 503 DATABASE_BUSY with the Retry-After its base path names (quoted)."""

    def do_GET(self):
        body = json.dumps({"error": {"code": "DATABASE_BUSY", "message": "as told",
                                     "details": {}}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", unquote(self.path.split("/")[1]))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _ErringAsTold(_AnsweringAsTold):
    """Answers every GET with the status and the error its path begins with: /404/ and the error
    quoted (JSON: {"error": ...})."""

    def do_GET(self):
        status, error = self.path.split("/")[1:3]
        body = json.dumps({"error": json.loads(unquote(error))}).encode()
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def told_how_to_fail(settings, upstreams, grpc_targets):  # noqa: F811
    """A gateway reaching orders over gRPC (`client`, with a shopper's `auth`) and over HTTP
    (`client_over_http`, whose orders URL is set per test), each answered as the test tells it:
    `servicer.trailers`, and the Retry-After an HTTP service's base path names."""
    from tests.integration.test_gateway import _Served

    servicer = _FailingAsTold()
    server, bind = _orders_served_by(servicer, workers=2)
    over_http = _Served(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnsweringAsTold))
    erring_over_http = _Served(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErringAsTold))
    client = None
    try:
        client = _gateway(settings, upstreams, grpc_targets, "grpc", orders_grpc_target=bind)
        session = client.post("/api/auth/register", json={
            "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
        yield types.SimpleNamespace(
            servicer=servicer, client=client, http_url=over_http.url,
            erring_http_url=erring_over_http.url,
            auth={"Authorization": f"Bearer {session['access_token']}"})
    finally:
        over_http.close()
        erring_over_http.close()
        server.stop(grace=None)
        if client is not None:  # (last: a failure to close it leaves no server running)
            close_app(client.application)  # (a module's: see conftest.py's apps_made_are_closed)


_A_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize("trailers, status, code", [
    ({HTTP_STATUS_KEY: "not a status"}, 502, "BAD_GATEWAY"),
    ({HTTP_STATUS_KEY: "600"}, 502, "BAD_GATEWAY"),
    ({HTTP_STATUS_KEY: "200"}, 502, "BAD_GATEWAY"),
    ({HTTP_STATUS_KEY: "-404"}, 502, "BAD_GATEWAY"),
    ({HTTP_STATUS_KEY: "4_04"}, 502, "BAD_GATEWAY"),  # int() reads it as 404
    ({HTTP_STATUS_KEY: "404.0"}, 502, "BAD_GATEWAY"),
    ({HTTP_STATUS_KEY: ""}, 502, "BAD_GATEWAY"),
    ({ERROR_CODE_KEY: None}, 502, "BAD_GATEWAY"),  # no code
    ({ERROR_CODE_KEY: ""}, 502, "BAD_GATEWAY"),
    ({ERROR_CODE_KEY: "<b>no code</b>"}, 502, "BAD_GATEWAY"),
    ({ERROR_DETAILS_KEY: "{"}, 502, "BAD_GATEWAY"),
    ({ERROR_DETAILS_KEY: "[1]"}, 502, "BAD_GATEWAY"),
    ({ERROR_DETAILS_KEY: None}, 502, "BAD_GATEWAY"),  # (a service writes them always, {} or more)
    ({ERROR_DETAILS_KEY: "[" * 3000 + "]" * 3000}, 502, "BAD_GATEWAY"),  # too deep to read
    ({HTTP_STATUS_KEY: "500", ERROR_CODE_KEY: "INTERNAL_ERROR"}, 502, "BAD_GATEWAY"),
    # (its rollback for the deadline: nothing done, said so; any other 504 may have been done)
    ({HTTP_STATUS_KEY: "504", ERROR_CODE_KEY: "CALLER_GAVE_UP"}, 504, "CALLER_GAVE_UP"),
    ({HTTP_STATUS_KEY: "504", ERROR_CODE_KEY: "GATEWAY_TIMEOUT"}, 504, "UPSTREAM_TIMEOUT"),
    ({HTTP_STATUS_KEY: "504", ERROR_CODE_KEY: "CALLER_GAVE_UP", ERROR_DETAILS_KEY: None},
     502, "BAD_GATEWAY"),
    ({}, 404, "ORDER_NOT_FOUND"),  # the trailers a service writes, relayed
], ids=["no number", "600", "200", "negative", "an underscore", "a fraction", "empty",
        "no code", "an empty code", "no code's form", "details no JSON", "details no object",
        "no details", "details too deep", "a 500", "a 504 rolled back", "a 504 of another code",
        "a 504 rolled back in trailers that are none", "as written"])
def test_trailers_that_are_none_of_a_services_are_a_502_not_a_500(told_how_to_fail, trailers,
                                                                  status, code):
    """As over HTTP (gateway_app/proxy.py), a failed call whose trailers say no error of the
    API's is the service failing, and a 5xx of its own but a 503 is answered for as over HTTP.
    (Of an operation that documents a 404.)"""
    written = {HTTP_STATUS_KEY: "404", ERROR_CODE_KEY: "ORDER_NOT_FOUND",
               ERROR_DETAILS_KEY: json.dumps({"order_id": "x"}), **trailers}
    told_how_to_fail.servicer.trailers = tuple(
        (key, value) for key, value in written.items() if value is not None)
    answer = told_how_to_fail.client.get(f"/api/orders/{uuid.uuid4()}",
                                         headers=told_how_to_fail.auth)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (status, code)
    if status in (502, 504):
        assert answer.get_json()["error"]["details"] == {"service": "orders"}


@pytest.mark.parametrize("retry_after, passed_on", [
    ("1", "1"),
    (_A_DATE, "1"),  # a date, as the seconds until it (passed: at least 1)
    ("86401", "86400"),  # at most a day
    ("9" * 4301, "86400"),  # (past the 4300 digits Python's int() reads)
    ("soon", None),
    ("-1", None),
    ("1.5", None),
    ("", None),
    ("Sunday, 06-Nov-94 08:49:37 GMT", None),
])
def test_a_retry_after_is_passed_on_as_at_most_a_days_seconds_or_left_out_over_both_transports(
        settings, told_how_to_fail, retry_after, passed_on):
    """The service's 503 is relayed, with its Retry-After only if it is one (RFC 9110: delay
    seconds, or an HTTP-date as a sender writes one), as at most a day's seconds: over HTTP it
    was passed on as it came."""
    told_how_to_fail.servicer.trailers = (
        (HTTP_STATUS_KEY, "503"), (ERROR_CODE_KEY, "DATABASE_BUSY"),
        (ERROR_DETAILS_KEY, "{}"), (RETRY_AFTER_KEY, retry_after))
    over_http = gateway_app.create_app(settings=dataclasses.replace(
        settings, gateway_upstream_transport="http",
        orders_service_url=f"{told_how_to_fail.http_url}/{quote(retry_after, safe='')}"))
    for transport, client in (("grpc", told_how_to_fail.client),
                              ("http", over_http.test_client())):
        answer = client.get("/api/orders", headers=told_how_to_fail.auth)
        assert answer.status_code == 503, transport
        assert answer.get_json()["error"]["code"] == "DATABASE_BUSY", transport
        assert answer.headers.get("Retry-After") == passed_on, transport


_LEFT_OUT = object()  # (the code, or the details)


class _RefusingTheDeadline(_AnsweringAsTold):
    """Answers every GET as a service answers a deadline the gateway signed of no form it reads."""

    def do_GET(self):
        body = json.dumps({"error": {"code": "INVALID_DEADLINE", "message": "as told",
                                     "details": {}}}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_deadline_a_service_refuses_for_its_form_is_a_502_over_both_transports(
        settings, told_how_to_fail, caplog):
    """The gateway writes every deadline it signs in the form the services read; one a service
    refused all the same (a gateway of another release) was relayed as a 400 INVALID_DEADLINE, to
    a client that sent no such header. The gateway's fault, as an identity refused: a 502, and
    the operator told."""
    from tests.integration.test_gateway import _Served

    told_how_to_fail.servicer.trailers = ((HTTP_STATUS_KEY, "400"),
                                          (ERROR_CODE_KEY, "INVALID_DEADLINE"),
                                          (ERROR_DETAILS_KEY, "{}"))
    refusing = _Served(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingTheDeadline))
    try:
        over_http = gateway_app.create_app(settings=dataclasses.replace(
            settings, gateway_upstream_transport="http", orders_service_url=refusing.url))
        for transport, client in (("grpc", told_how_to_fail.client),
                                  ("http", over_http.test_client())):
            caplog.clear()
            answer = client.get("/api/orders", headers=told_how_to_fail.auth)
            assert answer.status_code == 502, (transport, answer.get_json())
            assert answer.get_json()["error"]["code"] == "BAD_GATEWAY", transport
            assert "refused the deadline the gateway signed" in caplog.text, transport
    finally:
        refusing.close()


# (GET /api/orders/{order_id} documents ORDER_NOT_FOUND under 404, REQUEST_ENTITY_TOO_LARGE, Flask's
# own, a code_for of its name, under 413, and VALIDATION_ERROR under 422)
@pytest.mark.parametrize("status, code, details, relayed", [
    (404, "ORDER_NOT_FOUND", {"order_id": "x"}, True),
    (413, "REQUEST_ENTITY_TOO_LARGE", {}, True),
    (422, "VALIDATION_ERROR", {"query": {"limit": ["Not a valid integer."]}}, True),
    (404, "NOT_FOUND", {}, False),  # (of the API's, Flask's 404: a code the route does not give)
    (404, "<b>no code</b>", {}, False),
    (404, "", {}, False),
    (404, _LEFT_OUT, {}, False),
    (404, "not_found", {}, False),
    (404, "ORDER_NOT_FOUND", [1], False),
    (404, "ORDER_NOT_FOUND", None, False),
    (404, "ORDER_NOT_FOUND", "x", False),
    (404, "ORDER_NOT_FOUND", _LEFT_OUT, False),
], ids=["as written", "Flask's", "a 422's", "not the route's", "markup", "an empty code",
        "no code", "lower case", "details a list", "details null", "details a string",
        "no details"])
def test_an_error_of_the_apis_is_one_thing_over_both_transports(settings, told_how_to_fail,
                                                               status, code, details, relayed):
    """An error whose code and details are as the services write them, of a code the operation
    documents under its status, is relayed, any other a 502, over gRPC and over HTTP alike
    (gateway_app/upstream_answers.py: an_error_of_the_api): over HTTP any string for a code and
    any details were relayed."""
    told_how_to_fail.servicer.trailers = (
        (HTTP_STATUS_KEY, str(status)),
        *(((ERROR_CODE_KEY, code),) if code is not _LEFT_OUT else ()),
        *(((ERROR_DETAILS_KEY, json.dumps(details)),) if details is not _LEFT_OUT else ()))
    error = {key: value for key, value in (("code", code), ("message", "as told"),
                                           ("details", details)) if value is not _LEFT_OUT}
    over_http = gateway_app.create_app(settings=dataclasses.replace(
        settings, gateway_upstream_transport="http", orders_service_url=(
            f"{told_how_to_fail.erring_http_url}/{status}/{quote(json.dumps(error), safe='')}")))
    for transport, client in (("grpc", told_how_to_fail.client),
                              ("http", over_http.test_client())):
        answer = client.get(f"/api/orders/{uuid.uuid4()}",
                            headers=told_how_to_fail.auth).get_json()["error"]
        if relayed:
            assert (answer["code"], answer["details"]) == (code, details), transport
        else:
            assert (answer["code"], answer["details"]) == ("BAD_GATEWAY", {"service": "orders"}), \
                transport


def test_a_4xx_its_route_does_not_document_is_a_502_logged_over_both_transports(
        settings, upstreams, grpc_targets, told_how_to_fail, caplog):  # noqa: F811
    """A service's 4xx of a status the gateway's route does not document is no answer of the
    route's: a 502, logged with the route, the status and what the service said, whichever
    transport carried it. Over HTTP a URL naming the other service (whose 404 for a path it does
    not know is an error of the API's shape) was relayed as the route's 404, and a 405 relayed
    with no Allow (RFC 9110 asks one of every 405; the service's would name its own path's
    methods), where over gRPC the other service, not knowing the method, was a 502. The gateway's
    own 405 says which methods its path takes."""
    auth = told_how_to_fail.auth
    told = told_how_to_fail.servicer
    asked = [
        # Each service's address given for the other's.
        ("http", _gateway(settings, upstreams, grpc_targets, "http",
                          orders_service_url=upstreams["payments"].url),
         "/api/orders", "404", "NOT_FOUND"),
        ("grpc", _gateway(settings, upstreams, grpc_targets, "grpc",
                          orders_grpc_target=grpc_targets["payments"]),
         "/api/orders", None, None),
        # A path the service takes by another method: its own 405.
        ("http", _gateway(settings, upstreams, grpc_targets, "http",
                          payments_service_url=f"{upstreams['payments'].url}/accounts?then="),
         "/api/accounts/balance", "405", "METHOD_NOT_ALLOWED"),
        *(("grpc", told_how_to_fail.client, "/api/orders", status, code)
          for status, code in (("405", "METHOD_NOT_ALLOWED"), ("404", "ORDER_NOT_FOUND"))),
    ]
    for transport, client, path, status, code in asked:
        told.trailers = ((HTTP_STATUS_KEY, status or ""), (ERROR_CODE_KEY, code or ""),
                         (ERROR_DETAILS_KEY, "{}"))
        caplog.clear()
        answer = client.get(path, headers=auth)
        what = (transport, path, status)
        assert answer.status_code == 502, (what, answer.status_code, answer.get_json())
        assert answer.get_json()["error"] == {
            "code": "BAD_GATEWAY", "message": answer.get_json()["error"]["message"],
            "details": {"service": "payments" if "accounts" in path else "orders"}}, what
        if status is not None:
            said = code if transport == "http" else "as told"
            assert re.search(rf"GET {path}: \w+ answered {status} {code}, an error the route"
                             rf" does not document: .*{said}", caplog.text), (what, caplog.text)
    # The gateway's own 405, to a method none of its paths takes.
    spec = told_how_to_fail.client.get("/docs/openapi.json").get_json()
    for path in spec["paths"]:
        if path == "/api/notifications/ws":  # (any request there but a handshake: a 426)
            continue
        answer = told_how_to_fail.client.delete(path.replace("{order_id}", str(uuid.uuid4())),
                                                headers=auth)
        documented = {method.upper() for method in spec["paths"][path] if method != "parameters"}
        assert answer.status_code == 405, path
        assert documented <= set(answer.headers["Allow"].split(", ")), path


def test_an_error_code_its_route_does_not_document_is_a_502_logged_over_both_transports(
        settings, upstreams, grpc_targets, caplog):  # noqa: F811
    """A route that documents a 404 (ACCOUNT_NOT_FOUND: the caller has no account) relayed, over
    HTTP, the orders service's 404 NOT_FOUND for a path it does not know, its URL given for the
    payments service's: the status documented, its code not. Whichever transport carried it, an
    error whose code the route does not document under its status is a 502, logged, as over gRPC
    the other service, not knowing the method, was; the route's own 404 is still relayed."""
    right = {transport: _gateway(settings, upstreams, grpc_targets, transport)
             for transport in ("http", "grpc")}
    wrong = {"http": _gateway(settings, upstreams, grpc_targets, "http",
                              payments_service_url=upstreams["orders"].url),
             "grpc": _gateway(settings, upstreams, grpc_targets, "grpc",
                              payments_grpc_target=grpc_targets["orders"])}
    session = right["grpc"].post("/api/auth/register", json={
        "username": f"u-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
    auth = {"Authorization": f"Bearer {session['access_token']}"}  # (no account opened)
    asked = (("GET", "/api/accounts/balance", None),
             ("POST", "/api/accounts/deposit", {"amount": "10.00"}))
    for transport in ("http", "grpc"):
        for method, path, body in asked:
            what = (transport, method, path)
            answer = right[transport].open(path, method=method, json=body, headers=auth)
            assert (answer.status_code, answer.get_json()["error"]["code"]) == (
                404, "ACCOUNT_NOT_FOUND"), what
            caplog.clear()
            answer = wrong[transport].open(path, method=method, json=body, headers=auth)
            assert (answer.status_code, answer.get_json()["error"]) == (502, {
                "code": "BAD_GATEWAY", "message": "The payments service failed to answer.",
                "details": {"service": "payments"}}), (what, answer.get_json())
            if transport == "http":
                assert re.search(rf"{method} {path}: payments answered 404 NOT_FOUND, an error"
                                 " the route does not document", caplog.text), (what, caplog.text)
