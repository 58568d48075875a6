"""The shop the benchmark drives: its own stack on free ports with its own database, topic, group
and Redis names (as the tests isolate theirs) and secrets, the shoppers it seeds, and reads of its
databases (the orders' times, the work still owed)."""

from __future__ import annotations

import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg2
import requests

from bench.leftover_runs import (MIN_DATABASE_AGE_SECONDS, LiveRunMark, run_names_prefix,
                                 sweep_leftover_runs)
from devstack.infra import forget_redis_keys, free_port
from devstack.local_secrets import SECRET_BYTES
from devstack.postgres_data import forget_postgres_data
from devstack.stack import DEFAULT_PORTS, REPO_ROOT, Stack
from shared.config import SECRETS, SERVICES, load_settings
from shared.internal_auth import SignedAs

RUN_ID = uuid.uuid4().hex[:8]
# Redis database number of the benchmark's Celery queues (`make run` uses 0, the tests' layers 9 to
# 14, 11 among them: tests/environment.py's REDIS_DB). Each run keys its queues under a
# REDIS_KEY_PREFIX of its own, so a number shared takes nothing of another run's.
REDIS_DB = 11
FINAL_STATUSES = ("FINISHED", "CANCELLED")
# The name bench.relay_speed's topic has in the stack's namespace (relay_speed_topic).
RELAY_SPEED_TOPIC = "relay-speed"


def bench_stack(own_redis: bool = False, own_postgres: bool = False,
                on_servers: Callable[[str, str], None] | None = None) -> Stack:
    """An unstarted, quiet stack whose names are all this run's own, and so are the secrets it
    signs with, made for it: with those published with the code, its APIs warned of them (and
    the generator and the seeding sign with the stack's environment). Its data is thrown away as
    it stops, so its stop waits for no order in flight (Stack's data_thrown_away). With
    `own_redis` and `own_postgres`, on a Redis and a PostgreSQL of its own (Stack's), which the
    chaos soak restarts. `on_servers`: Stack's."""
    prefix = run_names_prefix(RUN_ID)
    env = {
        **{name: secrets.token_urlsafe(SECRET_BYTES) for name in SECRETS},
        "ORDERS_DATABASE_URL": f"{{postgres}}/hseshop_bench_{RUN_ID}_orders",
        "PAYMENTS_DATABASE_URL": f"{{postgres}}/hseshop_bench_{RUN_ID}_payments",
        "GATEWAY_DATABASE_URL": f"{{postgres}}/hseshop_bench_{RUN_ID}_gateway",
        "REDIS_KEY_PREFIX": prefix,
        "REDIS_URL": f"{{redis}}/{REDIS_DB}",
        "CELERY_BROKER_URL": f"{{redis}}/{REDIS_DB}",
        "KAFKA_CONSUMER_GROUP_PREFIX": prefix,
        "TOPIC_PAYMENT_REQUESTED": f"{prefix}.orders.payment-requested",
        "TOPIC_PAYMENT_RESULTS": f"{prefix}.payments.payment-results",
        "TOPIC_ORDER_STATUS_CHANGED": f"{prefix}.orders.order-status-changed",
        # (bench.relay_speed's own topic: the relay parks a row of a topic it is not told of.)
        "OUTBOX_EXTRA_TOPICS": f"{prefix}.{RELAY_SPEED_TOPIC}",
    }
    ports = {name: free_port() for name in DEFAULT_PORTS}
    return Stack(REPO_ROOT / ".run" / "bench", env_overrides=env, ports=ports, quiet=True,
                 own_redis=own_redis, own_postgres=own_postgres, on_servers=on_servers,
                 data_thrown_away=True)


def say(message: str) -> None:
    """A line of the benchmark's progress, on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def running_bench_stack(say=say, own_redis: bool = False, own_postgres: bool = False,
                        min_leftover_age: float = MIN_DATABASE_AGE_SECONDS) -> Iterator[Stack]:
    """A started bench_stack(own_redis, own_postgres), stopped and its data forgotten when the
    block ends. One on the machine's PostgreSQL and Redis marks itself live on them for as long
    as it runs, and first sweeps away what runs killed before left there (bench.leftover_runs;
    their databases `min_leftover_age` seconds old at least).
    (A stack with one server of its own and the other the machine's would need its mark on the
    machine's PostgreSQL: no caller runs one.)"""
    mark = LiveRunMark(RUN_ID)

    def mark_live_and_sweep(postgres_base: str, redis_base: str) -> None:
        mark.hold(postgres_base, f"{redis_base}/{REDIS_DB}")
        for line in sweep_leftover_runs(postgres_base, f"{redis_base}/{REDIS_DB}",
                                        min_database_age=min_leftover_age):
            say(line)

    shared = not own_redis and not own_postgres
    stack = bench_stack(own_redis, own_postgres, mark_live_and_sweep if shared else None)
    say("starting the stack...")
    try:
        stack.start()
        yield stack
    finally:
        try:
            stack.stop()
            forget_stack_data(stack)
        finally:
            mark.release()


def forget_stack_data(stack: Stack) -> None:
    """Drop the run's databases and delete its Redis keys once the stack has stopped (a Redis of
    its own stopped with it, keys and all; a PostgreSQL of its own stopped too, its data
    directory, databases and all, deleted, with what a start cut short left: initdb's folder,
    and the shared memory of a server killed and not started again)."""
    if stack.own_postgres:  # (a folder of the stack's alone: no other run's server is on it)
        if (removed := forget_postgres_data(stack.own_postgres_dir)) is not None:
            say(removed)
    try:
        stack.env
    except RuntimeError:
        return  # it never got as far as naming them
    if not stack.own_postgres:
        _drop_databases(stack)
    if not stack.own_redis:
        forget_redis_keys(stack.env["REDIS_URL"], stack.env["REDIS_KEY_PREFIX"])


def _drop_databases(stack: Stack) -> None:
    urls = [stack.env[f"{service}_DATABASE_URL"] for service in ("ORDERS", "PAYMENTS", "GATEWAY")]
    server = urls[0].rsplit("/", 1)[0]
    conn = psycopg2.connect(f"{server}/postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            for url in urls:
                cursor.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        conn.close()


def seed_shoppers(stack: Stack, count: int, balance: str = "1000000") -> list[str]:
    """Users with accounts rich enough that every benchmark order is paid (FINISHED)."""
    users = [f"bench-{RUN_ID}-{uuid.uuid4().hex[:6]}-{n}" for n in range(count)]
    secret = load_settings(stack.env).internal_auth_secret
    with requests.Session() as http:
        for user in users:
            http.post(f"{stack.payments_url}/accounts", auth=SignedAs(user, secret), timeout=10
                      ).raise_for_status()
            http.post(f"{stack.payments_url}/accounts/deposit", json={"amount": balance},
                      auth=SignedAs(user, secret), timeout=10).raise_for_status()
    return users


@contextmanager
def service_cursor(stack: Stack, service: str) -> Iterator:
    """A cursor on one service's database, in one transaction committed when the block ends."""
    conn = psycopg2.connect(stack.env[f"{service.upper()}_DATABASE_URL"])
    try:
        with conn, conn.cursor() as cursor:
            yield cursor
    finally:
        conn.close()


@dataclass(frozen=True)
class OrderTimes:
    order_id: str
    status: str
    created_at: datetime
    updated_at: datetime

    @property
    def seconds_to_final(self) -> float | None:
        if self.status not in FINAL_STATUSES:
            return None
        return (self.updated_at - self.created_at).total_seconds()


def status_counts(times: list[OrderTimes]) -> dict[str, int]:
    """How many of the orders are in each status (FINISHED: paid; CANCELLED: refused, as for a
    shopper with no account or too little money, a path far cheaper than the paid one)."""
    return dict(sorted(Counter(t.status for t in times).items()))


def order_times(stack: Stack, order_ids: list[str]) -> list[OrderTimes]:
    """Status and timestamps of the given orders, straight from the orders database (exact)."""
    with service_cursor(stack, "orders") as cursor:
        cursor.execute("SELECT id::text, status, created_at, updated_at FROM orders"
                       " WHERE id = ANY(%s::uuid[])", (order_ids,))
        return [OrderTimes(*row) for row in cursor.fetchall()]


def wait_until_final(stack: Stack, order_ids: list[str], timeout: float) -> bool:
    """Wait for every given order to be final; False if some are still NEW after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with service_cursor(stack, "orders") as cursor:
            cursor.execute("SELECT count(*) FROM orders WHERE id = ANY(%s::uuid[])"
                           " AND status = 'NEW'", (order_ids,))
            if cursor.fetchone()[0] == 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


# Work some service still owes: outbox rows not yet acknowledged by Kafka, inbox messages neither
# handled nor parked; and every inbox message ever stored, which moves while Kafka delivers.
_PENDING_WORK = """
SELECT (SELECT count(*) FROM outbox_messages),
       (SELECT count(*) FROM inbox_messages WHERE processed_at IS NULL AND parked_at IS NULL),
       (SELECT count(*) FROM inbox_messages)"""


def wait_until_idle(stack: Stack, timeout: float, quiet_polls: int = 3) -> bool:
    """Wait until no service owes any work (what the last measurement caused is done, down to the
    gateway's notifications); False if it never settles within `timeout`.

    A message between one service's outbox and the next one's inbox is in neither, so idle means
    the same counts, with nothing owed, `quiet_polls` times in a row a quarter of a second apart.
    """
    deadline = time.monotonic() + timeout
    last, quiet = None, 0
    while True:
        counts = tuple(_pending_work(stack, service) for service in SERVICES)
        owed = any(outbox or unhandled for outbox, unhandled, _stored in counts)
        quiet = quiet + 1 if not owed and counts == last else 0
        if quiet >= quiet_polls:
            return True
        if time.monotonic() > deadline:
            return False
        last = counts
        time.sleep(0.25)


def _pending_work(stack: Stack, service: str) -> tuple[int, int, int]:
    with service_cursor(stack, service) as cursor:
        cursor.execute(_PENDING_WORK)
        return cursor.fetchone()
