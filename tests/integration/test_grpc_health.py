"""The gRPC servers' standard health service (shared.grpc_health) and the probe compose's
healthchecks run (shared.grpc_health_probe), on real servers: Check SERVING while the service's
database answers, NOT_SERVING while it does not and once the server begins to stop, no identity
asked of a probe; Watch not served (UNIMPLEMENTED), and no flood of health calls keeping the
shop's own calls from being answered."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

import orders_app
from devstack.infra import free_port
from shared.grpc_server import begin_stopping, build_server
from shared.protos import orders_pb2, orders_pb2_grpc
from tests.integration.test_operator_commands import _slow_grpc_server, _stopped
from tests.network_tools import Accepting
from tests.polling import wait_for
from tests.signed_requests import grpc_signed

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ORDERS = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name


@contextmanager
def _started(service: str, app) -> Iterator[tuple[grpc.Server, str]]:
    """`app` served over gRPC as build_server builds it, on a free port: the server, its
    address."""
    bind = f"127.0.0.1:{free_port()}"
    server = build_server(service, app, bind)
    server.start()
    try:
        yield server, bind
    finally:
        server.stop(grace=None)


@contextmanager
def _serving(service: str, app) -> Iterator[str]:
    with _started(service, app) as (_, address):
        yield address


def _check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _probe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m shared.grpc_health_probe ARGS`, as compose's healthcheck runs it."""
    return subprocess.run([sys.executable, "-m", "shared.grpc_health_probe", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _without_a_database(settings):
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    return orders_app.create_app(settings=dataclasses.replace(settings,
                                                              orders_database_url=unreachable))


@pytest.mark.parametrize("service, name", [("orders", "hseshop.orders.v1.Orders"),
                                           ("payments", "hseshop.payments.v1.Payments")])
def test_a_server_whose_database_answers_is_serving_as_a_whole_and_by_service(
        request, service, name):
    app = request.getfixturevalue(f"{service}_flask_app")
    with _serving(service, app) as address:
        assert _check(address) == SERVING
        assert _check(address, name) == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            _check(address, "hseshop.nothing.v1.Nothing")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert (_probe(address).returncode, _probe(address, "--service", name).returncode) == (
            0, 0)
        assert "grpc.health.v1.Health" in ProtoReflectionDescriptorDatabase(
            grpc.insecure_channel(address)).get_services()


def test_a_server_whose_database_does_not_answer_is_not_serving_and_its_probe_fails(settings):
    """Its calls would all be 503 DATABASE_UNAVAILABLE: it says so, and the probe exits 1."""
    app = _without_a_database(settings)
    with _serving("orders", app) as address:
        assert _check(address) == NOT_SERVING
        assert _check(address, ORDERS) == NOT_SERVING
        probed = _probe(address)
        assert probed.returncode == 1
        assert probed.stderr == f"{address} (the server): NOT_SERVING\n"


def test_a_health_call_needs_no_identity_and_opens_no_other_call_to_none(orders_flask_app):
    with _serving("orders", orders_flask_app) as address:
        assert _check(address) == SERVING  # (no metadata at all)
        with pytest.raises(grpc.RpcError) as refused:
            orders_pb2_grpc.OrdersStub(grpc.insecure_channel(address)).ListOrders(
                orders_pb2.ListOrdersRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_probe_fails_on_nothing_listening_or_no_answer_within_its_timeout():
    nothing = f"127.0.0.1:{free_port()}"
    probed = _probe(nothing)
    assert probed.returncode == 1
    assert probed.stderr.startswith(f"{nothing} (the server): UNAVAILABLE: "), probed.stderr
    # A port that takes the connection and never answers: the probe's timeout, not compose's.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    silent = Accepting(listener, held.append)
    try:
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        began = time.monotonic()
        probed = _probe(address, "--timeout", "1")
        assert time.monotonic() - began < 10
        assert probed.returncode == 1
        assert probed.stderr.startswith(f"{address} (the server): DEADLINE_EXCEEDED"), \
            probed.stderr
    finally:
        silent.close()
        for connection in held:
            connection.close()


@pytest.mark.parametrize("args", [("127.0.0.1:1", "--timeout", "x"), (), ("127.0.0.1:1", "-x")])
def test_the_probes_usage_error_exits_1_not_the_2_docker_reserves(args):
    """argparse's own exit for arguments it cannot use is 2, which Docker reserves for a
    healthcheck (only 0 and 1 are to be used): 1, with argparse's message."""
    probed = _probe(*args)
    assert probed.returncode == 1
    assert "python -m shared.grpc_health_probe: error: " in probed.stderr, probed.stderr


def test_a_check_as_the_server_begins_to_stop_is_not_serving_and_after_its_stop_refused(
        settings, tmp_path):
    """Asked as its stop begins (the gRPC stop, which refuses every call after it, not yet
    called), the server says NOT_SERVING; once stopping, the probe fails."""
    bind = f"127.0.0.1:{free_port()}"
    server = _slow_grpc_server(
        tmp_path, bind, grace=20,
        as_stop_begins="from shared.grpc_health_probe import status;"
                       " print('as the stop begins:', status(os.environ['ORDERS_GRPC_BIND']),"
                       " flush=True)")
    try:
        wait_for(lambda: "orders gRPC listening on" in (tmp_path / "grpc.log").read_text()
                 or server.poll() is not None, timeout=60, what="the gRPC server to listen")
        assert _probe(bind).returncode == 0
        with grpc.insecure_channel(bind) as channel:
            slow = channel.unary_unary("/test.Slow/Sleep").future(b"")  # (holds the grace)
            wait_for(lambda: "slow call" in (tmp_path / "grpc.log").read_text(), timeout=30,
                     what="the slow call to be taken")
            server.send_signal(signal.SIGTERM)
            wait_for(lambda: "grace begun" in (tmp_path / "grpc.log").read_text(), timeout=30,
                     what="the stop's grace to begin")
            assert "as the stop begins: NOT_SERVING\n" in (tmp_path / "grpc.log").read_text()
            probed = _probe(bind)
            assert server.poll() is None  # (still in its grace: the slow call runs)
            assert probed.returncode == 1, probed.stderr
            slow.cancel()
    finally:
        server.send_signal(signal.SIGTERM)  # (a second: the grace cut short)
        _stopped(server, 30)


def test_watch_and_list_are_not_served_and_say_so_without_a_traceback(orders_flask_app, caplog):
    """Watch answers UNIMPLEMENTED, which the health spec has its clients take as "not
    supported", and not retry: a Watch held its stream open as long as its client liked, outside
    the server's limit on the calls it takes in hand, and every status pushed to each watcher
    took the server's threads. List alike; neither logs grpcio's "Exception calling
    application" traceback (the generated servicer's NotImplementedError), which anyone could
    have the server write at will."""
    with _serving("orders", orders_flask_app) as address, \
            grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as watched:
            next(watch)
        assert watched.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as listed:
            health.List(health_pb2.HealthListRequest(), timeout=10)
        assert listed.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _check(address) == SERVING
    assert "Exception calling application" not in caplog.text


WATCHES_ASKED = 200
WATCHES_ASKED_AT_ONCE = 20
CHECKS_AT_ONCE = 50


@contextmanager
def _flooded_with_health_calls(address: str) -> Iterator[list[int]]:
    """WATCHES_ASKED Watches asked of the server at `address` (each held open, unread, where one
    is served), then CHECKS_AT_ONCE threads asking its Check over and over, till the block ends:
    the statuses the Checks were given, once the threads are done."""
    with ExitStack() as cleanup:
        channel = cleanup.enter_context(grpc.insecure_channel(address))
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(0, WATCHES_ASKED, WATCHES_ASKED_AT_ONCE):  # (within the calls in hand)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
                       for _ in range(WATCHES_ASKED_AT_ONCE)]
            for watch in watches:
                cleanup.callback(watch.cancel)
            wait_for(lambda: all(watch.done() or watch.initial_metadata() is not None
                                 for watch in watches), timeout=30, what="Watches to be taken")
        statuses: list[int] = []
        failures: list[grpc.RpcError] = []
        enough = threading.Event()
        begun = threading.Barrier(CHECKS_AT_ONCE + 1)

        def check_till_enough() -> None:
            begun.wait(timeout=30)
            while not enough.is_set():
                try:
                    statuses.append(health.Check(health_pb2.HealthCheckRequest(),
                                                 timeout=10).status)
                except grpc.RpcError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=check_till_enough) for _ in range(CHECKS_AT_ONCE)]
        for thread in threads:
            thread.start()
        try:
            begun.wait(timeout=30)
            wait_for(lambda: len(statuses) >= CHECKS_AT_ONCE, timeout=30,
                     what="the Checks to be answered")
            yield statuses
        finally:
            enough.set()
            for thread in threads:
                thread.join(timeout=30)
        assert [exc.code() for exc in failures] == []


def _list_orders_signed(address: str, timeout: float) -> float:
    """A signed ListOrders answered at `address` within `timeout`: how long it took."""
    listing = orders_pb2.ListOrdersRequest()
    metadata = grpc_signed("health-flood", "/hseshop.orders.v1.Orders/ListOrders", listing)
    began = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        reply = orders_pb2_grpc.OrdersStub(channel).ListOrders(listing, metadata=metadata,
                                                               timeout=timeout)
    assert list(reply.items) == []
    return time.monotonic() - began


def test_a_flood_of_health_calls_keeps_no_signed_call_from_being_answered(orders_flask_app):
    """Watches asked by the hundred and Checks by the fifty at once, none of them signed: the
    shop's own calls are still answered, each in time. A Check holds no lock another call waits
    for and sends nothing to anyone else; a Watch is refused at once, so none stays open."""
    with _serving("orders", orders_flask_app) as address, \
            _flooded_with_health_calls(address) as statuses:
        took = [_list_orders_signed(address, timeout=5) for _ in range(5)]
        assert max(took) < 2, took
    assert set(statuses) == {SERVING}


def test_begin_stopping_waits_for_nothing_and_a_check_then_is_not_serving(orders_flask_app):
    """begin_stopping flips a flag: it returns at once whatever the health calls in flight. A
    Check made after it, before grpcio's stop, says NOT_SERVING (the server still serves its
    calls); after the stop, every call is refused, UNAVAILABLE, which the probe reads as
    unhealthy alike."""
    with _started("orders", orders_flask_app) as (server, address):
        with _flooded_with_health_calls(address):
            began = time.monotonic()
            begin_stopping(server)
            assert time.monotonic() - began < 0.5
            assert _check(address) == NOT_SERVING
            assert _check(address, ORDERS) == NOT_SERVING
            _list_orders_signed(address, timeout=5)  # (its calls still served till its stop)
        server.stop(grace=None).wait(30)
        with pytest.raises(grpc.RpcError) as refused:
            _check(address)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        probed = _probe(address)
        assert probed.returncode == 1
        assert probed.stderr.startswith(f"{address} (the server): UNAVAILABLE: "), probed.stderr
