"""The Orders service's tables: orders, whose status moves from NEW to FINISHED or CANCELLED."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, DateTime, Index, Numeric, String, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import db

NEW = "NEW"
FINISHED = "FINISHED"
CANCELLED = "CANCELLED"
STATUSES = (NEW, FINISHED, CANCELLED)


class Order(db.Model):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    description: Mapped[str] = mapped_column(String(500), default="")
    status: Mapped[str] = mapped_column(String(16), default=NEW)
    reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("status IN ('NEW', 'FINISHED', 'CANCELLED')", name="status_known"),
        Index("ix_orders_user_newest", "user_id", created_at.desc(), id.desc()),
    )

    @property
    def is_final(self) -> bool:
        return self.status != NEW
