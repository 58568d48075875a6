"""The inbox's table: a row for each message consumed, kept until it is handled and pruned."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (BigInteger, Boolean, DateTime, Index, Integer, LargeBinary, SmallInteger,
                        String, Text, false, func, text)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import db


class InboxMessage(db.Model):
    __tablename__ = "inbox_messages"

    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    topic: Mapped[str] = mapped_column(String(249))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str | None] = mapped_column(String(255))
    type: Mapped[str | None] = mapped_column(String(100))
    # The envelope's version. A message of a version this reader did not know is kept as its text
    # (raw_value) under its own id, and read again whole by the replay that hands it on
    # (handling._ready_to_handle); the version is checked again for the rest, so that a message
    # read whole by a release that knew its version is not handled by one that does not (a
    # rollback). None for a record never parsed; 1 by default, as the rows stored before the
    # column was, and those a release before this one writes, all are.
    envelope_version: Mapped[int | None] = mapped_column(SmallInteger, server_default=text("1"))
    correlation_id: Mapped[str | None] = mapped_column(String(100))
    request_id: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict | None] = mapped_column(JSONB)
    raw_value: Mapped[str | None] = mapped_column(Text)
    # SHA-256 of the record's value as it came (of no bytes for a record without one): a record
    # under a message id already stored is a repeat if its value is the same bytes
    # (taken_ids). None for a row stored before the column was, or by the release before it.
    value_digest: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The Kafka record's timestamp: when the sending relay produced it (None if it has none).
    produced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The times below are the database's clock (shared.db.database_now), the clock of every
    # time the sweeper compares: `received_at`, so its `last_attempt_at`, and its `processed_at`
    # and `parked_at` once it is tried, are written by it, in SQL where a statement writes them
    # (clock_timestamp()), or as read from it where a caller must know the very value written (a
    # mark unmark_unsent clears again). On the workers' clocks, one ahead of the database's by more
    # than the sweep's minimum age had every new message swept at once, and a handler behind the
    # sweeper's clock had its try taken for lost.
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # When a try last began (in a task of its own: note_try_begun) or ended, the sweeper last
    # handed the message over again, or a replay made it as new: by the database's clock, as
    # received_at is.
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A try by a task of its own has begun (note_try_begun) and not ended. Closed, by whichever
    # task or sweep does it, in the statement that marks the message processed or parked, records
    # or counts a failure, or counts the try lost (and by a replay, which makes the row as new).
    try_open: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(
            "ix_inbox_messages_pending",
            "received_at",
            postgresql_where=text("processed_at IS NULL AND parked_at IS NULL"),
        ),
        # For pruning old handled rows (pruning.prune_handled_messages), in the order they were
        # handled.
        Index("ix_inbox_messages_handled_at", "processed_at",
              postgresql_where=text("processed_at IS NOT NULL")),
        # For an operator's parked messages (parked.parked_messages, parked_batch), in the order
        # they were parked.
        Index("ix_inbox_messages_parked", "parked_at", "message_id",
              postgresql_where=text("parked_at IS NOT NULL")),
    )

