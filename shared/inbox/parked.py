"""The operator's parked messages: listed, handed back to be handled as new, or discarded."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer

from shared.inbox.model import InboxMessage, utc_now


def parked_messages(session: Session, limit: int) -> list[InboxMessage]:
    """The most recently parked messages, newest first."""
    return list(session.scalars(
        select(InboxMessage).where(InboxMessage.parked_at.is_not(None))
        .options(defer(InboxMessage.payload), defer(InboxMessage.raw_value))  # (not listed)
        .order_by(InboxMessage.parked_at.desc()).limit(limit)))


def unpark_messages(session: Session, message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Clear the park, and the attempts, of parked messages that hold an event (of all of them when
    `message_ids` is None), so that they are handled again as if new; returns their ids.

    The caller dispatches them. Their last attempt counts from now, so the sweeper leaves them to
    that dispatch for a while and takes them up only if it was lost. A record that could not be
    parsed holds no event to hand a handler, and stays parked.
    """
    return _update_parked(session, message_ids, InboxMessage.payload.is_not(None),
                          parked_at=None, attempts=0, last_attempt_at=utc_now(), try_open=False)


def discard_parked_messages(session: Session,
                            message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Give up on parked messages (every one when `message_ids` is None), never to be handled;
    returns their ids.

    The row stays, marked processed with the error that parked it kept, so that the message,
    should Kafka deliver it again, is dropped as a repeat; it is pruned a retention after the
    discard (prune_handled_messages).
    """
    return _update_parked(session, message_ids, parked_at=None, processed_at=utc_now(),
                          last_error="discarded by an operator; parked for: "
                          + func.coalesce(InboxMessage.last_error, ""))


def _update_parked(session: Session, message_ids: list[uuid.UUID] | None, *conditions,
                   **values) -> list[uuid.UUID]:
    """Set `values` on the parked messages named (every one when `message_ids` is None) that meet
    `conditions`; returns their ids."""
    query = (update(InboxMessage).where(InboxMessage.parked_at.is_not(None), *conditions)
             .values(**values).returning(InboxMessage.message_id))
    if message_ids is not None:
        query = query.where(InboxMessage.message_id.in_(message_ids))
    return list(session.scalars(query.execution_options(synchronize_session=False)))
