"""The bare baseline for order intake: a WSGI endpoint doing what POST /orders does at its core
(one order row and one outbox row in one transaction, raw psycopg2, nothing else), served by
gunicorn exactly as the orders API is.

The rows are real: the relay sends the outbox rows on and the pipeline settles the orders, so the
baseline runs with the same work going on behind it as the API does.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from datetime import datetime, timezone
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


def create_app():
    """The WSGI callable gunicorn serves; each thread keeps one connection of its own."""
    settings = get_settings()
    dsn = settings.orders_database_url
    topic = settings.topic_payment_requested
    local = threading.local()

    def connection():
        if getattr(local, "connection", None) is None or local.connection.closed:
            local.connection = psycopg2.connect(dsn)
        return local.connection

    def place_order(environ, start_response):
        user_id = environ.get("HTTP_X_USER_ID", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        amount = f"{float(body['amount']):.2f}"
        order_id, message_id = uuid.uuid4(), uuid.uuid4()
        now = datetime.now(timezone.utc)
        envelope = {"message_id": str(message_id), "type": "PaymentRequested", "version": 1,
                    "occurred_at": now.isoformat(), "correlation_id": str(order_id),
                    "payload": {"order_id": str(order_id), "user_id": user_id, "amount": amount}}
        request_id = uuid.uuid4().hex  # the API gives every request an id, and its rows carry it
        with connection() as conn, conn.cursor() as cursor:  # one transaction, committed on exit
            cursor.execute(INSERT_ORDER, (str(order_id), user_id, amount,
                                          body.get("description", ""), now, now))
            cursor.execute(INSERT_OUTBOX, (str(message_id), topic, user_id, str(order_id),
                                           json.dumps(envelope, separators=(",", ":")), request_id,
                                           now))
        response = json.dumps({"id": str(order_id), "user_id": user_id, "amount": amount,
                               "status": "NEW", "created_at": now.isoformat()}).encode()
        start_response("202 ACCEPTED", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(response)))])
        return [response]

    return place_order


def baseline_process(port: int, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    """The (unstarted) gunicorn serving the baseline on `port` with the stack's environment."""
    return ManagedProcess("baseline-api",
                          [sys.executable, "-m", *gunicorn_argv(port, "bench.baseline:create_app()")],
                          env, log_dir / "baseline-api.log", REPO_ROOT)
