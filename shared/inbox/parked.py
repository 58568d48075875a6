"""The operator's parked messages: listed, handed back to be handled as new, or discarded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, defer

from shared.inbox.model import InboxMessage

# The order the parked messages are read in, newest first for `list`, oldest first for every one
# in batches: the order of the index of the parked rows alone (ix_inbox_messages_parked), so that
# neither reads the rest of the inbox.
_PARKED_ORDER = (InboxMessage.parked_at, InboxMessage.message_id)


@dataclass(frozen=True)
class ParkedPlace:
    """A parked message's place in the order the messages were parked (ties by message id)."""
    parked_at: datetime
    message_id: uuid.UUID


def parked_messages(session: Session, limit: int) -> list[InboxMessage]:
    """The most recently parked messages, newest first."""
    return list(session.scalars(
        _newest_parked_first(InboxMessage)
        .options(defer(InboxMessage.payload), defer(InboxMessage.raw_value))  # (not listed)
        .limit(limit)))


def count_parked_messages(session: Session) -> int:
    """How many messages are parked: for the sweeper to remind of them (read off the parked rows'
    index, ix_inbox_messages_parked, not the whole inbox)."""
    return session.scalar(select(func.count()).select_from(InboxMessage)
                          .where(InboxMessage.parked_at.is_not(None)))


def last_parked(session: Session) -> ParkedPlace | None:
    """The place of the message parked last (None while none is)."""
    row = session.execute(_newest_parked_first(*_PARKED_ORDER).limit(1)).one_or_none()
    return row and ParkedPlace(*row)


def _newest_parked_first(*columns):
    return (select(*columns).where(InboxMessage.parked_at.is_not(None))
            .order_by(*(column.desc() for column in _PARKED_ORDER)))


def parked_batch(session: Session, through: ParkedPlace, after: ParkedPlace | None,
                 size: int) -> list[ParkedPlace]:
    """The places of the first `size` parked messages after `after` (from the first when None),
    and up to `through`, in the order they were parked: one transaction's share of them all, read
    from the index of the parked rows. Those that the change made of them passes over (a record
    never parsed, which a replay leaves parked) are counted in the batch all the same, so that no
    later batch reads them again."""
    place = tuple_(*_PARKED_ORDER)
    query = (select(*_PARKED_ORDER)
             .where(InboxMessage.parked_at.is_not(None), place <= tuple_(*_values(through)))
             .order_by(*_PARKED_ORDER).limit(size))
    if after is not None:
        query = query.where(place > tuple_(*_values(after)))
    return [ParkedPlace(*row) for row in session.execute(query)]


def _values(place: ParkedPlace) -> tuple[datetime, uuid.UUID]:
    return place.parked_at, place.message_id


def parked_among(session: Session, message_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of the messages `message_ids` are parked now (by their ids, through the primary
    key)."""
    return set(session.scalars(select(InboxMessage.message_id).where(
        InboxMessage.message_id.in_(message_ids), InboxMessage.parked_at.is_not(None))))


def unpark_messages(session: Session, message_ids: list[uuid.UUID],
                    marked_at: datetime | None = None) -> list[uuid.UUID]:
    """Clear the park, and the attempts, of those of the messages that are parked and hold an
    event (an envelope read as far as its type: with its payload, or kept as its text for a
    version the service did not know), so that they are handled again as if new; returns their
    ids.

    The caller dispatches them. They are marked handed over `marked_at` (their last attempt; the
    database's clock by default, which the sweeper measures by: the caller passes it, read from
    that clock, shared.db.database_now, to clear the marks again should the dispatch fail,
    shared.inbox.sweeping's unmark_unsent), so the sweeper leaves them to that dispatch for
    a while and takes them up only if it was lost. A record that could not be parsed holds no
    event to hand a handler, and stays parked.
    """
    return [row.message_id for row in _update_parked(
        session, message_ids, InboxMessage.type.is_not(None), parked_at=None, attempts=0,
        try_open=False, last_attempt_at=marked_at or func.clock_timestamp())]


def never_parsed_parked(session: Session, message_ids: list[uuid.UUID]) -> int:
    """How many of the messages are parked records that could not be parsed, which a replay
    leaves parked (unpark_messages): by their ids, through the primary key."""
    return session.scalar(
        select(func.count()).select_from(InboxMessage)
        .where(InboxMessage.message_id.in_(message_ids), InboxMessage.parked_at.is_not(None),
               InboxMessage.type.is_(None)))


def discard_parked_messages(session: Session, message_ids: list[uuid.UUID]) -> list[Row]:
    """Give up on those of the messages that are parked, never to be handled; returns a row for
    each, with its message_id, type (None for a record never parsed) and order_id: its payload's,
    as text, None when it holds none (a message kept as its text, a payload without one). Read by
    the statement that discards them, so they are the messages it discarded, whatever was parked
    or replayed as it ran.

    The row stays, marked processed with the error that parked it kept, so that the message,
    should Kafka deliver it again, is dropped as a repeat; it is pruned a retention after the
    discard (prune_handled_messages).
    """
    return _update_parked(session, message_ids, parked_at=None,
                          processed_at=func.clock_timestamp(),
                          last_error="discarded by an operator; parked for: "
                          + func.coalesce(InboxMessage.last_error, ""),
                          returning=(InboxMessage.message_id, InboxMessage.type,
                                     InboxMessage.payload["order_id"].astext.label("order_id")))


def _update_parked(session: Session, message_ids: list[uuid.UUID], *conditions,
                   returning=(InboxMessage.message_id,), **values) -> list[Row]:
    """Set `values` on those of the messages that are parked and meet `conditions`; returns a row
    of the `returning` columns (their id alone unless given) for each."""
    query = (update(InboxMessage)
             .where(InboxMessage.message_id.in_(message_ids), InboxMessage.parked_at.is_not(None),
                    *conditions)
             .values(**values).returning(*returning))
    return session.execute(query.execution_options(synchronize_session=False)).all()
