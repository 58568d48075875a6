"""The gateway's tables: the people who can sign in, the tokens they have signed out, the
notifications they are owed, and how far each one's notifications have been pruned."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (BigInteger, DateTime, Index, Integer, LargeBinary, String, UniqueConstraint,
                        func, text)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from gateway_app.usernames import username_key_of
from shared.db import db


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # As its user typed it signing up: shown (the sign-in's answer, the token's `username`).
    username: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(255))
    # Of the user's tokens: signing out everywhere moves it on, and every token of an earlier one
    # is refused (gateway_app/sign_out.py).
    token_generation: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    # Under the name PostgreSQL gave it, as the first migration made it: the username's key's
    # index (below) makes it needless, but the release before names it in its sign-up's ON
    # CONFLICT (username), which fails without it (so it stays until a later release drops it).
    __table_args__ = (UniqueConstraint("username", name="users_username_key"),)


# What tells a username from another's, whatever the case (gateway_app/usernames.py): unique, and
# what sign-in finds a user through (revision 0018).
Index("ix_users_username_key", username_key_of(User.username), unique=True)


class SignedOutToken(db.Model):
    """A token signed out before it expired: refused from then on (gateway_app/sign_out.py), and
    forgotten a while after it has expired, when it is refused as expired anyway."""

    __tablename__ = "signed_out_tokens"

    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_signed_out_tokens_expires_at", "expires_at"),)


class Notification(db.Model):
    """Something a user's open pages must be told; kept so a page that reconnects can catch up."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ix_notifications_user_id", "user_id", "id"),
                      UniqueConstraint("message_id", name="notifications_message_id_key"))

    def to_json(self) -> dict:
        return {"id": self.id, "type": self.type, "payload": self.payload,
                "created_at": self.created_at.isoformat()}


class NotificationPruneMark(db.Model):
    """The id of the newest of a user's notifications that retention has pruned
    (gateway_app/notifications.py: prune_old_notifications), kept for good: a page whose `after` is
    below it has missed some notifications for good, and is told so (NotificationsMissed). Taken
    as the pruned rows are deleted, in their transaction; a user none of whose notifications has
    been pruned has none."""

    __tablename__ = "notification_prune_marks"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pruned_through: Mapped[int] = mapped_column(BigInteger)
