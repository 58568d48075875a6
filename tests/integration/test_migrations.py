"""Schema migrations against real PostgreSQL: rows waiting in the outbox survive them, both ways."""

from __future__ import annotations

import json

import psycopg2
import pytest
from alembic import command

from shared.config import SERVICES
from shared.db import driver_dsn
from shared.migrations import alembic_config, ensure_database
from shared.outbox import CLAIM_ROWS
from tests.environment import database_name

PENDING_PAYLOAD = {"order_id": "o-1", "user_id": "u-1", "amount": "1.00"}


@pytest.mark.parametrize("service", ["orders", "payments"])
def test_an_unsent_outbox_row_keeps_its_message_through_the_envelope_migration_and_back(
        infrastructure, service):
    url = (f"{infrastructure.postgres_base}/{database_name('migrations', service)}"
           .replace("postgresql://", "postgresql+psycopg2://"))
    ensure_database(url)
    config = alembic_config(service, url)
    command.upgrade(config, "0004")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, payload,"
            " request_id, created_at) VALUES ('6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11', 'topic',"
            " 'u-1', 'PaymentRequested', 'o-1', %s, 'r-1', '2026-11-26 12:00:00.5+00')",
            (json.dumps(PENDING_PAYLOAD),))
    connection.close()

    command.upgrade(config, "head")
    assert _read(url, "envelope::text") == {
        "message_id": "6f1c1a8e-5b1e-4c39-9d0e-0d3a0f6b2a11", "type": "PaymentRequested",
        "version": 1, "occurred_at": "2026-11-26T12:00:00.500000+00:00", "correlation_id": "o-1",
        "payload": PENDING_PAYLOAD}
    command.downgrade(config, "0004")
    assert _read(url, "payload::text") == PENDING_PAYLOAD
    command.upgrade(config, "head")
    assert _read(url, "envelope::text")["payload"] == PENDING_PAYLOAD


@pytest.mark.parametrize("service", SERVICES)
def test_every_services_outbox_holds_what_the_relay_reads(infrastructure, service):
    """Beat runs a relay for every service, the gateway's included (it writes no outbox rows yet):
    each database, migrated to its head, must answer the relay's read."""
    url = (f"{infrastructure.postgres_base}/{database_name('relay-reads', service)}"
           .replace("postgresql://", "postgresql+psycopg2://"))
    ensure_database(url)
    command.upgrade(alembic_config(service, url), "head")
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(CLAIM_ROWS, {"batch_size": 1})
        assert cursor.fetchall() == []
    connection.close()


def _read(url: str, column: str) -> dict:
    with psycopg2.connect(driver_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM outbox_messages")
        (value,) = cursor.fetchone()
    connection.close()
    return json.loads(value)
