"""The benchmark, run tiny against the end-to-end stack so that it cannot rot: it checks that every
measurement runs and the report has its shape, never how fast anything is."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys

import psycopg2
import redis

from confluent_kafka.admin import AdminClient

from bench.latency_only import latency_line
from bench.plan import SMOKE
from bench.relay_speed import relay_speed_topic
from bench.report import write_gateway_transports_report, write_report
from bench.runner import run_benchmark
from bench.shop import REDIS_DB, RUN_ID, running_bench_stack
from devstack.infra import forget_redis_keys
from devstack.leftovers import RunRecord
from devstack.stack import REPO_ROOT, RUN_RECORD
from shared.config import load_settings


def test_a_tiny_benchmark_run_measures_everything_and_writes_its_report(stack, tmp_path):
    results = run_benchmark(stack, SMOKE, tmp_path / "load")
    json_path, markdown_path = write_report(results, tmp_path, chart=False)

    report = json.loads(json_path.read_text())
    assert "incomplete" not in report, report["incomplete"]
    for side in ("baseline", "orders_api"):
        assert report["intake"][side]["accepted_per_s"] > 0
        assert report["intake"][side]["errors"] == [], report["intake"][side]
    assert report["intake"]["ratio"] > 0
    # The baseline's work under each layer of the API's stack, each served and driven in turn.
    assert [floor["name"] for floor in report["intake"]["floors"]] == [
        "floor-flask", "floor-flask-sqlalchemy", "floor-flask-smorest"]
    for floor in report["intake"]["floors"]:
        assert floor["accepted_per_s"] > 0 and floor["ratio"] > 0 and not floor["errors"], floor
        assert floor["drained"] and floor["server_cpu_ms_per_request"] > 0
    # Each measurement (and each intake turn) starts once the shop owes no work.
    assert report["intake"]["baseline"]["drained"] and report["intake"]["orders_api"]["drained"]
    assert "unsettled_before" not in report, report["unsettled_before"]
    assert report["relay"]["rows"] == SMOKE.relay_rows
    assert report["relay"]["relay_rows_per_s"] > 0
    assert report["relay"]["raw_producer_rows_per_s"] > 0
    # The relay and the raw producer take turns, so that the machine's drift falls on both alike.
    assert len(report["relay"]["turns_relay_rows_per_s"]) == SMOKE.relay_rounds
    assert len(report["relay"]["turns_raw_producer_rows_per_s"]) == SMOKE.relay_rounds
    # Its topic is gone once measured: the test broker would hold its messages in memory.
    settings = load_settings(stack.env)
    topics = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers}).list_topics(
        timeout=5).topics
    assert relay_speed_topic(settings) not in topics
    # How many settle inside the smoke run's two-second window depends on the machine; that they
    # all settle does not, nor that the window counts none but the run's own orders, each once.
    capacity = report["capacity"]
    assert capacity["drained"] and capacity["orders"] > 0 and capacity["errors"] == []
    assert 0 < round(capacity["final_per_s"] * capacity["window_seconds"]) <= capacity["orders"]
    # Every bench shopper can pay: an order CANCELLED took the cheap path, a fault.
    assert capacity["statuses"] == {"FINISHED": capacity["orders"]}, capacity["statuses"]
    assert [row["offered_rate"] for row in report["latency"]] == list(SMOKE.latency_rates)
    for row in report["latency"]:
        assert row["drained"] and row["orders"] > 0
        assert row["statuses"] == {"FINISHED": row["orders"]}, row["statuses"]
        # Every order offered is in the percentiles: none failed, unsent or left not final.
        assert (row["failed"], row["errors"], row["unsent"], row["not_final"]) == (0, [], 0, 0)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert 0 <= row["offered_final_within_1s"] <= row["final_within_1s"] <= 1
        assert row["generator_cpu_percent"] >= 0
        assert all(ms is not None and ms >= 0 for ms in row["hops_p50_ms"].values()), row
        assert 0 < row["machine_busy"] <= 1
        assert {"orders-api", "orders-worker", "payments-worker", "PostgreSQL"} <= set(
            row["cpu_ms_per_order"]), row["cpu_ms_per_order"]
    gateway = report["gateway_transports"]
    assert set(gateway["endpoints"]) == {"balance", "order"} and gateway["orders_drained"]
    for name, endpoint in gateway["endpoints"].items():
        for transport in ("grpc", "http"):
            row = endpoint[transport]
            assert row["requests"] > 0, (name, transport, row)
            assert row["errors"] == 0, (name, transport, row["errors"], row["error_kinds"],
                                        _what_the_gateways_logged_amiss(stack))
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
            assert row["generator_cpu_percent"] >= 0
        assert endpoint["grpc_over_http"] > 0
    assert {"orders-api", "orders-worker", "payments-worker", "baseline-api", "floor-flask-smorest",
            "gateway-grpc", "gateway-http"} <= set(report["peak_rss_mb"])
    assert report["targets"] and all(isinstance(t["met"], bool) for t in report["targets"])
    assert not [t for t in report["targets"] if t["cancelled"]], report["targets"]
    # The servers the figures depend on, named with their versions: the broker is the test one.
    assert report["servers"]["kafka_broker"].startswith("tansu ")
    assert report["servers"]["postgresql"] and report["servers"]["redis"]
    assert f"Kafka broker: {report['servers']['kafka_broker']}" in markdown_path.read_text()
    assert "| order intake (POST/s) |" in markdown_path.read_text()
    assert "Relay speed in turns of" in markdown_path.read_text()
    assert "| + flask-smorest, marshmallow (the API's schemas) |" in markdown_path.read_text()
    assert "## Gateway: services over gRPC against HTTP" in markdown_path.read_text()
    assert "| -> final status |" in markdown_path.read_text()
    # `python -m bench.gateway_transports` writes the same section as a report of its own.
    _, alone = write_gateway_transports_report(results, tmp_path / "alone")
    assert "| GET /api/accounts/balance | HTTP |" in alone.read_text()


def test_the_latency_runs_alone_give_a_line_of_their_figures(stack, tmp_path):
    """`python -m bench.latency_only`, for interleaved runs of two versions of the code."""
    line = latency_line(stack, SMOKE, "this code", tmp_path / "load")
    assert line["label"] == "this code" and line["unsettled_before"] == []
    assert [row["offered_rate"] for row in line["latency"]] == list(SMOKE.latency_rates)
    for row in line["latency"]:
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 0 <= row["offered_final_within_1s"] <= row["final_within_1s"] <= 1
        assert row["hops_p50_ms"] and row["cpu_ms_per_order"]
    json.dumps(line)


# A bench run that is killed once its stack is up (its stack's processes, in sessions of their
# own, left running, as `kill -9` of `make bench` leaves them). It seeds a shopper first, for the
# payments service's keys beside Celery's.
_KILLED_RUN = """
import signal, sys
from bench.shop import RUN_ID, running_bench_stack, seed_shoppers
with running_bench_stack(lambda message: None) as stack:
    seed_shoppers(stack, 1)
    print(RUN_ID, stack.env["ORDERS_DATABASE_URL"], flush=True)
    signal.pause()
"""


def test_a_bench_stack_leaves_no_data_and_sweeps_away_what_a_killed_run_left(infrastructure):
    """Its databases and Redis keys go as it stops; and, as it starts, those of a bench run killed
    outright (no mark held, its processes stopped as the stack starts, so nothing connected to its
    databases: bench.leftover_runs): the keys its shop wrote, Celery's that never expire
    included."""
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_RUN], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    server = psycopg2.connect(f"{infrastructure.postgres_base}/postgres")
    server.autocommit = True
    keys = redis.Redis.from_url(f"{infrastructure.redis_base}/{REDIS_DB}")
    killed_id = None
    try:
        assert select.select([killed.stdout], [], [], 180)[0], "the run to kill never came up"
        killed_id, killed_orders_url = killed.stdout.readline().split()
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        # (The bench's servers are the machine's, as the session's are: else it swept another
        # PostgreSQL and Redis than those looked at here.)
        on_the_sessions = killed_orders_url.startswith(f"{infrastructure.postgres_base}/")
        if on_the_sessions:
            left = {name.decode() for name in _bench_keys(keys, killed_id)}
            assert _bench_databases(server, killed_id)
            assert any(name.startswith(f"bench.{killed_id}:celery:_kombu.binding.")
                       for name in left), sorted(left)
            assert any(name.startswith(f"bench.{killed_id}:payments:") for name in left), left
        # (Its databases are seconds old: none is spared for its age here.)
        with running_bench_stack(lambda message: None, min_leftover_age=0):
            assert _bench_databases(server, RUN_ID) and _bench_keys(keys, RUN_ID)
            if on_the_sessions:
                assert _bench_databases(server, killed_id) == []
                assert _bench_keys(keys, killed_id) == []
        assert _bench_databases(server, RUN_ID) == [] and _bench_keys(keys, RUN_ID) == []
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
        killed.stdout.close()
        # (What it left running, had the test ended before a stack stopped it.)
        record = RunRecord(REPO_ROOT / ".run" / "bench" / RUN_RECORD)
        record.begin()
        record.end()
        if killed_id is not None:
            with server.cursor() as cursor:
                for name in _bench_databases(server, killed_id):
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            forget_redis_keys(f"{infrastructure.redis_base}/{REDIS_DB}", f"bench.{killed_id}:")
        server.close()
        keys.close()


def _bench_databases(server, run_id: str) -> list[str]:
    with server.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                       (f"hseshop\\_bench\\_{run_id}\\_%",))
        return [name for (name,) in cursor.fetchall()]


def _bench_keys(keys, run_id: str) -> list[bytes]:
    return list(keys.scan_iter(match=f"bench.{run_id}*", count=1000))


def _what_the_gateways_logged_amiss(stack) -> list[str]:
    """The lines that say a request failed or something went wrong, of the benchmark's two
    gateways' logs and of the services' APIs they call (a 503 or a 502 is explained there): what
    a failing run (in CI, say, whose logs are gone after it) needs to be read. The last 15 of
    each log."""
    amiss = re.compile(r"-> [45][0-9][0-9]\b|WARNING|ERROR|Traceback|closed a kept-alive")
    lines = []
    for name in ("gateway-grpc", "gateway-http", "orders-api", "orders-grpc", "payments-api",
                 "payments-grpc"):
        path = stack.logs_dir / f"{name}.log"
        if path.exists():
            lines += [f"{name}: {line}" for line in path.read_text(errors="replace").splitlines()
                      if amiss.search(line)][-15:]
    return lines
