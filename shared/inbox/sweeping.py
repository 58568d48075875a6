"""The sweeper's claim of stalled messages (their dispatch or try lost), to hand them over again,
or to park them once their lost tries reach the limit."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.inbox.model import utc_now
from shared.request_context import request_id_bound

log = logging.getLogger(__name__)

# Stalled messages one sweep hands back at most. Each is marked as it is, so the next sweeps leave
# it to that dispatch: a sweep need not stop at what the handlers get through before the next one
# (after Redis was down a minute, thousands wait; 500 a sweep took minutes to catch up).
SWEPT_PER_RUN = 5_000


@dataclass(frozen=True)
class StalledMessage:
    """A message the sweeper hands over again, and its tries so far (a try of it lost with its
    worker counted)."""

    message_id: uuid.UUID
    attempts: int


def claim_stalled_messages(session: Session, min_age: timedelta, max_attempts: int | None,
                           limit: int = SWEPT_PER_RUN) -> list[StalledMessage]:
    """Messages still waiting to be handled, stored and last tried or handed over (if ever) over
    `min_age` ago: their dispatch was lost, or their try or retries with their worker; oldest
    first. Each is marked handed over now (`last_attempt_at`, as replaying a parked message marks
    it), so it comes back only if this dispatch is lost too. A row a handler holds locked is left
    to it.

    With `max_attempts` given, a try that began (a task of the message's own notes it:
    note_try_begun) and never ended counts as an attempt, once: its handling crashed its worker
    (or hung it until PostgreSQL ended the transaction, shared.db's SESSION_LIMITS) and recorded
    no failure, and would otherwise be handed over, and crash a worker, every sweep for ever. One
    that reaches `max_attempts` so is parked instead (and not returned), its last error kept.
    Nothing else is counted: a task that never began may wait in a worker's memory yet (taken
    from the queue ahead of its turn), or have been lost with a worker that crashed for another
    message's sake. Without `max_attempts` (while dispatched tasks wait in the queue), nothing is
    counted, and an open try stays on record for a later sweep.
    """
    now = utc_now()
    claimed = session.execute(_CLAIM_STALLED, {
        "cutoff": now - min_age, "now": now, "limit": limit,
        "counting": 1 if max_attempts else 0, "max_attempts": max_attempts or 0,
        "gave_up": _GAVE_UP.format(max_attempts)})
    stalled = []
    for message_id, attempts, parked, request_id in claimed:
        if parked:
            with request_id_bound(request_id):
                log.error("parked inbox message %s: %s", message_id, _GAVE_UP.format(attempts))
        else:
            stalled.append(StalledMessage(message_id, attempts))
    return stalled


_GAVE_UP = ("tried {} times and never handled: its handling may crash or hang the worker (its"
            " tries were lost with it)")
# `lost`: a try that began and never ended, counted (and so closed) when sweeping with `counting`.
_CLAIM_STALLED = text("""
WITH stalled AS (
    SELECT message_id, CASE WHEN :counting = 1 AND try_open THEN 1 ELSE 0 END AS lost
    FROM inbox_messages
    WHERE processed_at IS NULL AND parked_at IS NULL AND received_at < :cutoff
          AND (last_attempt_at IS NULL OR last_attempt_at < :cutoff)
    ORDER BY received_at LIMIT :limit
    FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE inbox_messages
    SET last_attempt_at = :now, attempts = inbox_messages.attempts + stalled.lost,
        try_open = inbox_messages.try_open AND stalled.lost = 0,
        parked_at = CASE WHEN stalled.lost = 1 AND inbox_messages.attempts + 1 >= :max_attempts
                         THEN :now END,
        last_error = CASE
            WHEN stalled.lost = 1 AND inbox_messages.attempts + 1 >= :max_attempts
            THEN left(:gave_up || coalesce('; last error: ' || inbox_messages.last_error, ''), 2000)
            ELSE inbox_messages.last_error END
    FROM stalled
    WHERE inbox_messages.message_id = stalled.message_id
    RETURNING inbox_messages.message_id, inbox_messages.received_at, inbox_messages.attempts,
              inbox_messages.parked_at IS NOT NULL AS parked, inbox_messages.request_id)
SELECT message_id, attempts, parked, request_id FROM claimed ORDER BY received_at""")
