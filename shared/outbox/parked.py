"""The operator's parked outbox rows: listed, handed back to the relay, or discarded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.outbox.relaying import PARKED_ROWS
from shared.outbox.writing import OUTBOX_CHANNEL


@dataclass(frozen=True)
class ParkedOutboxMessage:
    message_id: uuid.UUID
    topic: str
    key: str | None
    type: str
    parked_at: datetime
    attempts: int
    last_error: str | None
    waiting_behind: int  # later rows with its topic and key, which the relay holds back


def parked_outbox_messages(session: Session, limit: int) -> list[ParkedOutboxMessage]:
    """The most recently parked rows, newest first, each with how many rows wait behind it (counted
    by reading the table: for an operator, not the relay)."""
    rows = session.execute(_PARKED, {"limit": limit}).all()
    return [ParkedOutboxMessage(*row) for row in rows]


_PARKED = text("""
SELECT message_id, topic, key, type, parked_at, attempts, last_error,
       (SELECT count(*) FROM outbox_messages AS behind
        WHERE behind.topic = parked.topic AND behind.key = parked.key AND behind.id > parked.id
              AND behind.parked_at IS NULL)
FROM outbox_messages AS parked WHERE """ + PARKED_ROWS + """
ORDER BY parked_at DESC, id DESC LIMIT :limit""")


def unpark_outbox_messages(session: Session,
                           message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Hand parked rows (every one when `message_ids` is None) back to the relay, to be sent
    again in their place, before the rows behind them (once what made the message too large is
    mended; one still too large is parked again); returns their ids. The relay is woken as the
    caller's transaction commits."""
    return _change_parked_rows(session, _UNPARK, message_ids)


def redirect_parked_outbox_messages(session: Session, message_ids: list[uuid.UUID] | None,
                                    topic: str, shop_topics: list[str],
                                    from_topic: str | None = None) -> list[uuid.UUID]:
    """Hand rows parked for a topic that is not among `shop_topics` (every one when `message_ids`
    is None; only those of `from_topic` when given) back to the relay to be sent to `topic`
    instead, each with the rows waiting behind it (its old topic and key, written after it), so
    that those go on after it, in their order, rather than each be parked in turn; returns the
    parked rows' ids. (A row parked for its size is left alone: its topic is the shop's.) The relay
    is woken as the caller's transaction commits."""
    chosen, params = "", {"topic": topic, "shop_topics": list(shop_topics)}
    if message_ids is not None:
        chosen, params["message_ids"] = " AND message_id = ANY(:message_ids)", message_ids
    if from_topic is not None:
        chosen, params["from_topic"] = chosen + " AND topic = :from_topic", from_topic
    ids = list(session.scalars(text(_REDIRECT.format(chosen=chosen)), params))
    if ids:
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": OUTBOX_CHANNEL})
    return ids


def parked_topics_not_the_shops(session: Session, shop_topics: list[str]) -> list[str]:
    """The topics not among `shop_topics` that parked rows name (for `replay --all --to-topic`,
    which sends the rows of one such topic on)."""
    return list(session.scalars(text(
        f"SELECT DISTINCT topic FROM outbox_messages WHERE {PARKED_ROWS}"
        " AND topic <> ALL(:shop_topics) ORDER BY topic"), {"shop_topics": list(shop_topics)}))


def discard_parked_outbox_messages(session: Session,
                                   message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Delete parked rows (every one when `message_ids` is None), never to be sent, so that the
    rows behind them go; returns their ids. The relay is woken as the caller's transaction
    commits."""
    return _change_parked_rows(session, _DISCARD, message_ids)


def _change_parked_rows(session: Session, statement: str,
                        message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Run `statement` on the parked rows named (every one when `message_ids` is None); returns
    their ids, and has the relay woken when the transaction commits."""
    if message_ids is None:
        chosen, params = "", {}
    else:
        chosen, params = " AND message_id = ANY(:message_ids)", {"message_ids": message_ids}
    ids = list(session.scalars(text(statement + chosen + " RETURNING message_id"), params))
    if ids:
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": OUTBOX_CHANNEL})
    return ids


# The rows behind and the parked rows are apart (the ones not parked, the others parked): the two
# updates of one statement never meet on a row.
_REDIRECT = """
WITH chosen AS (
    SELECT id, topic, key FROM outbox_messages
    WHERE """ + PARKED_ROWS + """ AND topic <> ALL(:shop_topics){chosen}
    FOR UPDATE),
behind AS (
    UPDATE outbox_messages AS later SET topic = :topic FROM chosen
    WHERE later.topic = chosen.topic AND later.key = chosen.key AND later.id > chosen.id
          AND later.parked_at IS NULL)
UPDATE outbox_messages AS parked SET topic = :topic, parked_at = NULL FROM chosen
WHERE parked.id = chosen.id
RETURNING parked.message_id"""
_UNPARK = f"UPDATE outbox_messages SET parked_at = NULL WHERE {PARKED_ROWS}"
_DISCARD = f"DELETE FROM outbox_messages WHERE {PARKED_ROWS}"
