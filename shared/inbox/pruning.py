"""Pruning the rows of messages handled (or discarded) a retention ago."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session


def prune_handled_messages(session: Session, cutoff: datetime, limit: int) -> int:
    """Delete the rows of up to `limit` handled messages stored, and handled, before `cutoff`,
    oldest first; returns how many (the caller repeats, a transaction each, until fewer than
    `limit`). A message is mostly handled moments after it is stored; one handled late (replayed
    after a park, say) keeps its row a whole retention from its handling, and one discarded
    (discard_parked_messages) from its discard: it was never handled, and no business key would
    make its coming again a no-op. The rows are found, oldest handled first, through an index of
    the handled rows by when they were handled, so such rows, however many, are not read until
    their time comes.

    The inbox's own dedup of a message lasts as long as its row. Kafka may deliver a message
    again later than that (it deletes records a segment at a time, so a record can outlive its
    topic's retention, and a group whose offsets expired starts again from the earliest), and
    then it is stored and handled anew: for a message that was handled, the handlers' business
    keys make that a no-op (one payment per order, a final order status never changes, one
    notification per message); one that was discarded is handled then for the first time (a
    PaymentRequested is paid, or refused). Discarded rows are told from handled ones only by
    their error's words, and kept longer they would be passed over in the index by every run:
    the README says so instead. Parked messages are kept, for an operator.
    """
    result = session.execute(_PRUNE, {"cutoff": cutoff, "limit": limit})
    return result.rowcount


# The rows by their physical place (ctid), found through ix_inbox_messages_handled_at: deleting by
# id instead let the planner join a whole-table scan to the ids. The condition is checked again on
# the rows reached: a row updated meanwhile is reached in its new version, which the inner query
# never saw. (Stored a retention ago is asked too, as before; a row is stored before it is handled,
# so that holds of nearly every row found, and is no help in finding them.)
_PRUNE = text("""
DELETE FROM inbox_messages
WHERE ctid = ANY(ARRAY(
          SELECT ctid FROM inbox_messages
          WHERE processed_at IS NOT NULL AND processed_at < :cutoff AND received_at < :cutoff
          ORDER BY processed_at
          LIMIT :limit))
  AND processed_at IS NOT NULL AND processed_at < :cutoff AND received_at < :cutoff""")
