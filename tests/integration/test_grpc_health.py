"""The gRPC servers' standard health service (shared.grpc_health) and the probe compose's
healthchecks run (shared.grpc_health_probe), on real servers: SERVING while the service's database
answers, NOT_SERVING while it does not and once the server begins to stop, a Watch told at once
then ended, and no identity asked of a probe."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
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
from shared.grpc_server import build_server, calls_grace
from shared.protos import orders_pb2, orders_pb2_grpc
from tests.integration.test_operator_commands import _slow_grpc_server, _stopped
from tests.network_tools import Accepting
from tests.polling import wait_for
from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ORDERS = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name


@contextmanager
def _serving(service: str, app) -> Iterator[str]:
    """`app` served over gRPC as build_server builds it, on a free port: its address."""
    bind = f"127.0.0.1:{free_port()}"
    server = build_server(service, app, bind)
    server.start()
    try:
        yield bind
    finally:
        server.stop(grace=None)


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
    assert _probe("127.0.0.1:1", "--timeout", "x").returncode == 2  # (argparse: a usage error)


def _orders_grpc_process(cleanup: ExitStack, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m shared.grpc_server orders` on a free port, killed and waited for by `cleanup`:
    the process and its address."""
    address = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        server = start_child([sys.executable, "-m", "shared.grpc_server", "orders"],
                             cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "ORDERS_GRPC_BIND": address})
    cleanup.callback(server.wait)
    cleanup.callback(server.kill)
    wait_for(lambda: f"orders gRPC listening on {address}" in log_path.read_text()
             or server.poll() is not None, timeout=60, what="the orders gRPC server to listen")
    assert server.poll() is None, log_path.read_text()
    return server, address


def test_a_watch_is_told_not_serving_as_the_server_begins_to_stop_then_ended(settings,
                                                                            tmp_path):
    """A load balancer watching the server's health hears NOT_SERVING as its stop begins, and
    drains it; its stream then ends, so the stop does not wait it out (the calls' grace, 7 s by
    default) before the process exits."""
    with ExitStack() as cleanup:
        server, address = _orders_grpc_process(cleanup, tmp_path / "grpc.log")
        channel = cleanup.enter_context(grpc.insecure_channel(address))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=60)
        assert next(watch).status == SERVING
        server.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        assert list(watch) == []  # ended, with OK (an RpcError otherwise)
        assert watch.code() == grpc.StatusCode.OK
        assert server.wait(timeout=30) == 0
        said = (tmp_path / "grpc.log").read_text()
        stopping = said.index("orders gRPC stopping")
        assert "orders gRPC stopped" in said[stopping:], said
    assert calls_grace(settings.upstream_timeout_seconds) >= 5  # (what it would have waited)


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
