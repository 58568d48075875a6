"""A payments worker run as deployed (Celery, 16 threads) whose database is cut off: what its inbox
handlers meet is an outage to wait out, no fault of the messages. A batch says so once (not a line
per try and per message), stays one batch and is tried again whole, so that once the database is
back its messages are handled once each, every key's in the order they were sent; a message's task
of its own says so once too, and leaves the message to the sweeper, which hands it over once the
database is back.

No beat runs here: nothing but the worker's own tasks handles the batch, and the test sweeps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from payments_app import service as payments
from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import driver_dsn, transaction
from shared.inbox.storing import ConsumedRecord
from shared.task_queues import handler_queue
from tasks.celery_app import app as celery_app
from tasks.inbox import handle_inbox_batch, handle_inbox_message, sweep_inbox
from tasks.services import service_app
from tests.network_tools import SilencingProxy
from tests.polling import wait_for
from tests.process_tools import stop

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = handler_queue("payments")
USERS, REQUESTS_EACH = 5, 10
# Connections the worker tries while the database is cut off, before it is back: a batch tried
# some ten times.
REFUSED_DURING_THE_OUTAGE = 20
LOST = "lost its database connection"
WARNING_OR_WORSE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")


@pytest.fixture
def payments_database(settings) -> Iterator[SilencingProxy]:
    """A proxy to the payments database, which the test can cut off and restore."""
    url = make_url(settings.database_url("payments"))
    proxy = SilencingProxy(f"{url.host}:{url.port or 5432}")
    yield proxy
    proxy.close()


class WorkerLog:
    """The worker's log file, read from a mark on."""

    def __init__(self, path: Path):
        self.path = path
        self._mark = 0

    def mark(self) -> None:
        self._mark = len(self.path.read_bytes())

    def lines_since_the_mark(self) -> list[str]:
        return self.path.read_bytes()[self._mark:].decode(errors="replace").splitlines()


@contextmanager
def _payments_worker(settings, database: SilencingProxy, tmp_path: Path) -> Iterator[WorkerLog]:
    """A payments worker taking the handlers' queue, reaching its database through `database`."""
    _purge()
    url = make_url(settings.database_url("payments")).set(
        host="127.0.0.1", port=int(database.address.rsplit(":", 1)[1]))
    env = {**os.environ, "PAYMENTS_DATABASE_URL": url.render_as_string(hide_password=False)}
    log = WorkerLog(tmp_path / "worker.log")
    with open(log.path, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", QUEUE,
             "-n", f"outage-{uuid.uuid4().hex[:8]}@localhost", "-P", "threads", "-c", "16",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " ready." in log.path.read_text(), timeout=60,
                 what="the worker to start")
        yield log
    finally:
        stop(worker, timeout=30)
        _purge()


def _purge() -> None:
    with celery_app.pool.acquire(block=True) as connection:
        connection.default_channel.queue_purge(QUEUE)


def _payment_requests(users: list[str], each: int) -> tuple[list[ConsumedRecord], list[str]]:
    """Each user's `each` payment requests of 1.00, keyed by the user and taken in turns, as
    records of one partition; and their order ids, in the order sent."""
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    records, order_ids = [], []
    for offset in range(len(users) * each):
        user = users[offset % len(users)]
        order_id = uuid.uuid4()
        event = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user,
                                              "amount": Decimal("1.00")}, None)
        records.append(ConsumedRecord(topic, 0, offset, user.encode(), encode(event.to_json()),
                                      {}))
        order_ids.append(str(order_id))
    return records, order_ids


def _accounts_of(users: list[str]) -> None:
    with service_app("payments").app_context(), transaction() as session:
        for user in users:
            payments.open_account(session, user_id=user)
            payments.deposit(session, user_id=user, amount=Decimal("100.00"))


def _query(settings, sql: str, *parameters) -> list[tuple]:
    with psycopg2.connect(driver_dsn(settings.database_url("payments"))) as connection:
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            rows = cursor.fetchall()
    connection.close()
    return rows


def _handled(settings, message_ids: list[uuid.UUID]) -> dict[str, int]:
    """How many of the messages are processed, parked or waiting, and the most attempts any
    processed one used."""
    ((processed, parked, most_attempts),) = _query(
        settings, "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL),"
                  " count(*) FILTER (WHERE parked_at IS NOT NULL),"
                  " coalesce(max(attempts) FILTER (WHERE processed_at IS NOT NULL), 0)"
                  " FROM inbox_messages WHERE message_id = ANY(%s::uuid[])",
        [str(message_id) for message_id in message_ids])
    return {"processed": processed, "parked": parked, "waiting": len(message_ids) - processed,
            "most_attempts": most_attempts}


def _all_processed(settings, message_ids: list[uuid.UUID]) -> bool:
    return _handled(settings, message_ids)["processed"] == len(message_ids)


def _answered_in_turn(settings, order_ids: list[str]) -> list[str]:
    """The orders, in the order their payments were decided (their answers' outbox rows)."""
    return [order_id for (order_id,) in _query(
        settings, "SELECT envelope::jsonb #>> '{payload,order_id}' FROM outbox_messages"
                  " WHERE envelope::jsonb #>> '{payload,order_id}' = ANY(%s) ORDER BY id",
        order_ids)]


def _warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if WARNING_OR_WORSE.search(line)]


def test_a_batch_cut_off_from_its_database_says_so_once_and_is_handled_in_order_once_back(
        settings, payments_inbox, payments_database, user_id, tmp_path):
    users = [f"{user_id}-{n}" for n in range(USERS)]
    _accounts_of(users)
    records, order_ids = _payment_requests(users, REQUESTS_EACH)
    with _payments_worker(settings, payments_database, tmp_path) as log:
        payments_database.cut()
        log.mark()
        message_ids = payments_inbox(records)
        assert len(message_ids) == len(records)
        handle_inbox_batch.apply_async(("payments", [str(m) for m in message_ids]))
        wait_for(lambda: payments_database.connections_refused() >= REFUSED_DURING_THE_OUTAGE,
                 timeout=60, what="the batch to be tried again and again")
        said_during_the_outage = log.lines_since_the_mark()
        payments_database.restore()
        wait_for(lambda: _all_processed(settings, message_ids), timeout=60,
                 what="every message to be handled once the database is back")

    (warning,) = _warnings(said_during_the_outage)
    assert f"the payments inbox handlers {LOST}" in warning
    assert len(said_during_the_outage) <= 3  # (the warning, and no line for each try)
    for user in users:
        sent = order_ids[users.index(user)::USERS]
        assert _answered_in_turn(settings, sent) == sent, user
    # Each handled at its one try that went through: no try that met the outage counted.
    assert _handled(settings, message_ids) == {"processed": len(message_ids), "parked": 0,
                                               "waiting": 0, "most_attempts": 1}
    ((succeeded,),) = _query(settings, "SELECT count(*) FROM payments WHERE status = 'SUCCEEDED'"
                                       " AND order_id = ANY(%s::uuid[])", order_ids)
    assert succeeded == len(order_ids)
    assert any("database connection back after" in line for line in log.lines_since_the_mark())


def test_a_messages_own_task_cut_off_from_its_database_says_so_once_and_leaves_it_to_the_sweeper(
        settings, payments_inbox, payments_database, user_id, tmp_path):
    users = [f"{user_id}-{n}" for n in range(USERS)]
    _accounts_of(users)
    records, _ = _payment_requests(users, 1)
    with _payments_worker(settings, payments_database, tmp_path) as log:
        payments_database.cut()
        log.mark()
        message_ids = payments_inbox(records)
        for message_id in message_ids:
            handle_inbox_message.apply_async(("payments", str(message_id)))
        # Each task tried to note that its try began, then to record that it failed.
        wait_for(lambda: payments_database.connections_refused() >= 2 * len(message_ids),
                 timeout=60, what="each task to try its message")
        said_during_the_outage = log.lines_since_the_mark()
        payments_database.restore()

        # Nothing of those tries could be recorded: once the messages have waited the sweep's
        # minimum age, a sweep (here the test's, on the database itself) hands them over.
        def swept_and_handled() -> bool:
            sweep_inbox.apply(args=("payments",)).get()
            return _all_processed(settings, message_ids)

        wait_for(swept_and_handled, timeout=60, interval=0.5,
                 what="the sweeper to hand the messages over and the worker to handle them")

    (warning,) = _warnings(said_during_the_outage)
    assert f"the payments inbox handlers {LOST}" in warning
    assert _handled(settings, message_ids) == {"processed": len(message_ids), "parked": 0,
                                               "waiting": 0, "most_attempts": 1}
