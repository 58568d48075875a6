"""The bare baseline for order intake: a WSGI endpoint doing what POST /orders does at its core
(one order row and one outbox row in one transaction, raw psycopg2, nothing else), served by
gunicorn exactly as the orders API is.

The rows are real: the relay sends the outbox rows on and the pipeline settles the orders, so the
baseline runs with the same work going on behind it as the API does. `write_order` is that work,
shared with the intake floors (bench/floors.py), which run it under the API's frameworks.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2

from devstack.processes import ManagedProcess
from devstack.stack import REPO_ROOT, gunicorn_argv
from shared.config import get_settings

INSERT_ORDER = (
    "INSERT INTO orders (id, user_id, amount, description, status, created_at, updated_at)"
    " VALUES (%s, %s, %s, %s, 'NEW', %s, %s)"
)
INSERT_OUTBOX = (
    "INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, envelope,"
    " request_id, created_at) VALUES (%s, %s, %s, 'PaymentRequested', %s, %s, %s, %s)"
)
CENT = Decimal("0.01")


@dataclass(frozen=True)
class WrittenOrder:
    id: uuid.UUID
    user_id: str
    amount: Decimal
    description: str
    created_at: datetime

    def body(self) -> dict:
        """The baseline's response body."""
        return {"id": str(self.id), "user_id": self.user_id, "amount": str(self.amount),
                "status": "NEW", "created_at": self.created_at.isoformat()}


def write_order(cursor, topic: str, user_id: str, amount: Decimal,
                description: str) -> WrittenOrder:
    """Insert a NEW order and its PaymentRequested outbox row with `cursor` (the caller commits)."""
    order = WrittenOrder(uuid.uuid4(), user_id, amount.quantize(CENT), description,
                         datetime.now(timezone.utc))
    message_id = uuid.uuid4()
    request_id = uuid.uuid4().hex  # the API gives every request an id, and its rows carry it
    envelope = {"message_id": str(message_id), "type": "PaymentRequested", "version": 1,
                "occurred_at": order.created_at.isoformat(), "correlation_id": str(order.id),
                "causation_id": request_id,
                "payload": {"order_id": str(order.id), "user_id": user_id,
                            "amount": str(order.amount)}}
    cursor.execute(INSERT_ORDER, (str(order.id), user_id, order.amount, description,
                                  order.created_at, order.created_at))
    cursor.execute(INSERT_OUTBOX, (str(message_id), topic, user_id, str(order.id),
                                   json.dumps(envelope, separators=(",", ":")), request_id,
                                   order.created_at))
    return order


def thread_connection(dsn: str):
    """A function returning this thread's own psycopg2 connection to `dsn`, opened on first use."""
    local = threading.local()

    def connection():
        if getattr(local, "connection", None) is None or local.connection.closed:
            local.connection = psycopg2.connect(dsn)
        return local.connection

    return connection


BASELINE_APP = "bench.baseline:create_app()"  # what gunicorn serves


def create_app():
    """The WSGI callable gunicorn serves; each thread keeps one connection of its own."""
    settings = get_settings()
    topic = settings.topic_payment_requested
    connection = thread_connection(settings.orders_database_url)

    def place_order(environ, start_response):
        user_id = environ.get("HTTP_X_USER_ID", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        with connection() as conn, conn.cursor() as cursor:  # one transaction, committed on exit
            order = write_order(cursor, topic, user_id, Decimal(body["amount"]),
                                body.get("description", ""))
        response = json.dumps(order.body()).encode()
        start_response("202 ACCEPTED", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(response)))])
        return [response]

    return place_order


def served_by_gunicorn(name: str, app: str, port: int, env: dict[str, str],
                       log_dir: Path) -> ManagedProcess:
    """The (unstarted) gunicorn serving the WSGI app `app` on `port` as the orders API is served."""
    return ManagedProcess(name, [sys.executable, "-m", *gunicorn_argv(port, app)],
                          env, log_dir / f"{name}.log", REPO_ROOT)
