"""The outbox's table, and its rows written in the caller's transaction (the use cases' side)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from psycopg2.extras import execute_values
from sqlalchemy import (JSON, BigInteger, DateTime, Index, Integer, String, Text, UniqueConstraint,
                        func, text)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.contracts import Envelope
from shared.db import db, driver_cursor
from shared.request_context import current_request_id

# Notified by the trigger on outbox_messages (shared/migration_steps.py) as inserts commit.
OUTBOX_CHANNEL = "outbox_messages"


class OutboxMessage(db.Model):
    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    topic: Mapped[str] = mapped_column(String(249))
    key: Mapped[str | None] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(100))
    correlation_id: Mapped[str | None] = mapped_column(String(100))
    # The whole message value as the relay sends it: JSON text, kept as written (type `json`).
    envelope: Mapped[dict] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Set when the broker refused the row: it is not tried again before then.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the message can never be sent as it is (too large, refused by the broker's
    # validation, of a topic that is not the shop's): then neither it nor the later rows with
    # its topic and key are relayed until an operator replays or discards it (tasks/parked.py).
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # As the migrations made them (shared/migration_steps.py): the unique constraint under the
    # name PostgreSQL gave it, the refused rows' index, which the relay's read looks rows up in
    # (relaying.CLAIM_ROWS), and the parked rows' own, in the order they were written, which an
    # operator's commands read them through (shared.outbox.parked).
    __table_args__ = (
        UniqueConstraint("message_id", name="outbox_messages_message_id_key"),
        Index("ix_outbox_messages_refused", "topic", "key", "id",
              postgresql_where=text("attempts > 0"),
              postgresql_include=["parked_at", "next_attempt_at"]),
        Index("ix_outbox_messages_parked_by_id", "id",
              postgresql_where=text("attempts > 0 AND parked_at IS NOT NULL"),
              postgresql_include=["message_id"]),
    )


_WRITTEN_TOGETHER = "hseshop.outbox_rows_written_together"


def add_outbox_message(session: Session, *, topic: str, key: str, event: Envelope,
                       request_id: str | None = None) -> None:
    """Write `event` to the outbox in the caller's transaction; its commit wakes the relay.

    The event carries `request_id` on to its consumers, as its envelope's `causation_id` and the
    message's `request_id` header alike: the id of the request it answers (an inbox handler passes
    the one its message came with), else the one the event holds, else the request being served;
    none when no request led to it.

    A plain INSERT on the driver (shared.db.driver_cursor): every order writes several of these,
    and nothing reads the row back in the transaction that writes it.
    """
    statement, parameters = outbox_message_statement(session, topic=topic, key=key, event=event,
                                                     request_id=request_id)
    if statement:
        with driver_cursor(session) as cursor:
            cursor.execute(statement, parameters)


def outbox_message_statement(session: Session, *, topic: str, key: str, event: Envelope,
                             request_id: str | None = None) -> tuple[str, dict[str, object]]:
    """`add_outbox_message`, for a caller that sends the row's INSERT in the round trip of a
    statement of its own (placing an order: the user's lock and the order's INSERT), one round
    trip fewer: the INSERT as SQL, ending in ";", for the caller to put before its own statement
    in one `execute`, and its named parameters (each name starts with "outbox_"), to be merged
    with the caller's. "" and no parameters when the rows of the block are written together
    (outbox_rows_written_together): the row has been added to them."""
    event = event.caused_by(request_id or event.causation_id or current_request_id())
    row = (str(event.message_id), topic, key, event.type, event.correlation_id, event.to_wire(),
           event.causation_id, event.occurred_at)
    written_together = session.info.get(_WRITTEN_TOGETHER)
    if written_together is not None:
        written_together.append(row)
        return "", {}
    return _INSERT_OUTBOX_MESSAGE, dict(zip(_OUTBOX_PARAMETERS, row))


@contextmanager
def outbox_rows_written_together(session: Session) -> Iterator[None]:
    """Outbox rows added in the block are written by one INSERT as it ends (and not at all if it
    raises), in the order they were added.

    For a caller that runs many use cases in one transaction with no savepoints, as an inbox batch
    does: a savepoint rolled back inside the block would not take its rows back.
    """
    rows: list[tuple] = []
    session.info[_WRITTEN_TOGETHER] = rows
    try:
        yield
    finally:
        session.info.pop(_WRITTEN_TOGETHER, None)
    if rows:
        with driver_cursor(session) as cursor:
            execute_values(cursor, _INSERT_OUTBOX_MESSAGES, rows, page_size=len(rows))


_INSERT_OUTBOX_MESSAGES = """
INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, envelope, request_id,
                             created_at)
VALUES %s"""
# The same, for one row, its values named (the names a caller's own parameters may sit beside).
_OUTBOX_PARAMETERS = ("outbox_message_id", "outbox_topic", "outbox_key", "outbox_type",
                      "outbox_correlation_id", "outbox_envelope", "outbox_request_id",
                      "outbox_created_at")
_INSERT_OUTBOX_MESSAGE = _INSERT_OUTBOX_MESSAGES.strip() % (
    "(" + ", ".join(f"%({name})s" for name in _OUTBOX_PARAMETERS) + ");")
