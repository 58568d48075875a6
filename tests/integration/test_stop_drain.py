"""devstack's drain at a stop (Stack._let_orders_in_flight_settle): what it counts as in flight,
the records the broker holds that a consumer group has not committed (counted right though
Tansu's high watermarks fall short of a batch's records, and without the group's consumers seeing
a rebalance), the outbox and inbox rows that can progress; and a lock held on a table it reads
costing it a look, not the stop; its last line saying what it left in flight."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
import uuid

import psycopg2
import psycopg2.extensions
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from devstack import stack as devstack_stack
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import Stack
from shared.config import SERVICES
from shared.db import driver_dsn
from shared.inbox.handling import count_messages_due
from shared.kafka import new_topic, records_unread_by
from shared.outbox.relaying import count_rows_that_may_go
from tests.polling import wait_for


def test_the_records_a_group_has_yet_to_commit_are_counted_and_its_consumers_left_alone(
        settings):
    servers = settings.kafka_bootstrap_servers
    topic, group = f"test.unread.{uuid.uuid4()}", f"test.unread.{uuid.uuid4()}"
    admin = AdminClient({"bootstrap.servers": servers})
    for created in admin.create_topics([new_topic(settings, topic)]).values():
        created.result(10)
    # Lingering, the producer sends each partition its records in batches of several: Tansu
    # answers a partition's high watermark with its last batch's first offset plus one.
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 50})
    for number in range(30):
        producer.produce(topic, b"record", str(number).encode())
    assert producer.flush(15) == 0
    rebalances = []
    consumer = Consumer({"bootstrap.servers": servers, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    consumer.subscribe([topic], on_assign=lambda _, parts: rebalances.append("assigned"),
                       on_revoke=lambda _, parts: rebalances.append("revoked"))
    try:
        assert records_unread_by(servers, group, [topic], timeout=5) == 30  # none committed
        consumed = 0

        def consume_to(count: int) -> bool:
            nonlocal consumed
            record = consumer.poll(0.1)
            if record is not None and record.error() is None:
                consumer.commit(record, asynchronous=False)
                consumed += 1
            return consumed >= count

        wait_for(lambda: consume_to(20), timeout=30, interval=0, what="20 records consumed")
        assert rebalances == ["assigned"]

        assert records_unread_by(servers, group, [topic], timeout=5) == 10
        assert records_unread_by(servers, group, [topic, f"{topic}.none"], timeout=5) == 10

        wait_for(lambda: consume_to(30), timeout=30, interval=0, what="the rest consumed")
        assert records_unread_by(servers, group, [topic], timeout=5) == 0
        # A probe joining the group would have it rebalance: the member heartbeating every half
        # a second would hear of it and give its partitions up.
        heard_until = time.monotonic() + 3
        while time.monotonic() < heard_until:
            consumer.poll(0.1)
        assert rebalances == ["assigned"]
    finally:
        consumer.close()


def test_only_the_outbox_and_inbox_rows_that_can_progress_count_as_in_flight(settings):
    """Not a row behind a parked row of its key, nor one waiting out a refusal, nor a stored
    message waiting out a failed try's backoff: those would hold the drain to its end."""
    connection = psycopg2.connect(driver_dsn(settings.database_url("orders")))
    # (One snapshot: what other tests commit meanwhile changes neither count.)
    connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    key = str(uuid.uuid4())
    try:
        with connection.cursor() as cursor:
            outbox_before, inbox_before = count_rows_that_may_go(cursor), count_messages_due(cursor)
            cursor.execute(
                "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
                " parked_at, next_attempt_at) VALUES"
                " (gen_random_uuid(), 't', %(key)s || '-parked', 'X', '{}', 1, now(), NULL),"
                " (gen_random_uuid(), 't', %(key)s || '-parked', 'X', '{}', 0, NULL, NULL),"
                " (gen_random_uuid(), 't', %(key)s || '-waiting', 'X', '{}', 1, NULL,"
                "  now() + interval '1 hour'),"
                " (gen_random_uuid(), 't', %(key)s || '-due', 'X', '{}', 0, NULL, NULL)",
                {"key": key})
            cursor.execute(
                'INSERT INTO inbox_messages (message_id, topic, partition, "offset", attempts,'
                " last_error, try_open, processed_at, parked_at) VALUES"
                " (gen_random_uuid(), 't', 0, 1, 0, NULL, false, NULL, NULL),"  # never tried
                " (gen_random_uuid(), 't', 0, 2, 1, 'failed', true, NULL, NULL),"  # in a try
                " (gen_random_uuid(), 't', 0, 3, 1, 'failed', false, NULL, NULL),"  # backoff
                " (gen_random_uuid(), 't', 0, 4, 3, 'failed', false, NULL, now()),"  # parked
                " (gen_random_uuid(), 't', 0, 5, 1, NULL, false, now(), NULL)")  # handled

            assert count_rows_that_may_go(cursor) - outbox_before == 1
            assert count_messages_due(cursor) - inbox_before == 2
    finally:
        connection.rollback()
        connection.close()


def test_a_lock_held_on_a_table_the_drain_reads_costs_it_its_looks_not_the_stop(
        settings, tmp_path, monkeypatch):
    """The drain's queries give a lock up after half a second (and a statement after one): held
    on the outbox, it ends with its SETTLE_SECONDS, saying it does not know what is in flight.
    Once, it waited for the lock, past its end (and a second Ctrl-C deferred meanwhile)."""
    monkeypatch.setattr(devstack_stack, "SETTLE_SECONDS", 2)
    holder = psycopg2.connect(driver_dsn(settings.database_url("orders")))
    released = threading.Timer(12, holder.rollback)
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
        released.start()
        said = io.StringIO()
        began = time.monotonic()
        with _a_stopping_shop(settings, tmp_path) as shop, contextlib.redirect_stderr(said):
            shop._let_orders_in_flight_settle()
        took = time.monotonic() - began
    finally:
        released.cancel()
        holder.rollback()
        holder.close()
    assert took < 5
    assert "stopping after 2 s, not knowing what is still in flight (" in said.getvalue()
    assert "lock timeout" in said.getvalue()


def test_a_drain_that_settles_says_nothing_was_left_in_flight(settings, tmp_path, monkeypatch):
    """A drain that waits until nothing is in flight says so as it ends: it said nothing after
    "waiting for the orders in flight to settle...", the stop's last line one that sounded cut
    short, though the stop was clean (README: the last line says what was left in flight). What
    is in flight is given (other tests share the databases and the broker): some, then none."""
    monkeypatch.setattr(devstack_stack, "SETTLE_QUIET_SECONDS", 0.3)
    counts = iter([3, 1])
    monkeypatch.setattr(Stack, "_in_flight",
                        lambda shop, connections, consumed, deadline: next(counts, 0))
    said = io.StringIO()
    with _a_stopping_shop(settings, tmp_path) as shop, contextlib.redirect_stderr(said):
        shop._let_orders_in_flight_settle()
    assert said.getvalue().splitlines()[-2:] == [
        "[devstack] waiting for the orders in flight to settle (Ctrl-C again skips this wait,"
        " losing them)...",
        "[devstack] nothing left in flight",
    ]


@contextlib.contextmanager
def _a_stopping_shop(settings, tmp_path):
    """A Stack as its drain finds it once its APIs have stopped: a worker running (a sleep under
    its name), the test's databases and broker its own."""
    port = settings.kafka_bootstrap_servers.rsplit(":", 1)[1]
    shop = Stack(tmp_path, ports={"broker": int(port)}, quiet=False)
    shop._env = {name: os.environ[name] for name in
                 [f"{service.upper()}_DATABASE_URL" for service in SERVICES]}
    shop._group = ProcessGroup(handle_signals=False)
    worker = shop._group.start(ManagedProcess("orders-worker", ["sleep", "60"], os.environ,
                                              tmp_path / "worker.log", tmp_path))
    try:
        yield shop
    finally:
        worker.stop()
