"""The sweeper's claim of stalled messages (their dispatch or try lost), to hand them over again,
or to park them once their lost tries reach the limit.

While tasks wait in the service's queue, a message's own dispatch may wait among them, and the
sweeper cannot tell it from a lost one. Handed over every five minutes, each message still waiting
put a batch more in the queue at every round, lengthening the backlog it waited in (workers down
ten minutes, then draining for twenty: a message near the end was handed over six times). So while
tasks wait, a message handed over (or tried) before waits, since, as long again as it had waited
by then, up to an hour (tasks.inbox's SWEEP_BACKOFF_WHILE_QUEUED_AT_MOST): handed over at 5, 10, 20,
40 and 80 minutes, its batches grow as the log of the backlog's length, not with it, up to that
hour (past a backlog of 80 minutes, by one an hour). One whose dispatch was truly lost is still
handed over, at worst about as late again as it was old (an hour late at most), and only while a
backlog holds up what comes after it anyway. One marked handed over whose dispatch was never sent
(Redis away) is unmarked (unmark_unsent), where the database can still be reached, not to wait
that out for nothing; one left marked (its replay's COMMIT cut off, say, or the database away
too) waits it out, an hour for a message replayed long after it came. With no task waiting
nothing waits longer than the sweep's minimum age: a message's dispatch is then in no queue, and
a lost try must be counted soon.

What is given up: a message whose task was lost early in a long backlog waits for its next handing
over, where a sweep every five minutes would have found it sooner. Two other ways were weighed. Not
handing over at all while tasks wait keeps a lost message for as long as the queue never reads
empty, which under steady load can be for ever. And a note of each message's last dispatch (in
`last_attempt_at`, as now, or in Redis) cannot tell a task still in the queue from a lost one:
only the queue's turnover since the dispatch could, and a Redis list keeps no position of a task.
Backing off needs no column, no Redis key and no read of the queue but its length, which the sweep
reads already.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.inbox.committed_lines import say_once_committed
from shared.db import database_now

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
                           limit: int = SWEPT_PER_RUN,
                           backoff_at_most: timedelta | None = None,
                           now: datetime | None = None) -> list[StalledMessage]:
    """Messages still waiting to be handled, stored and last tried or handed over (if ever) over
    `min_age` ago: their dispatch was lost, or their try or retries with their worker; oldest
    first. Each is marked handed over `now` (`last_attempt_at`, as replaying a parked message marks
    it), so it comes back only if this dispatch is lost too. A row a handler holds locked is left
    to it. `now` is the database's clock (database_now) unless given: the clock `received_at` and
    every `last_attempt_at` are written by, so that how long a message has waited is measured on
    one clock, whatever the workers' say (the caller reads it, and passes it, to clear the marks
    again with unmark_unsent).

    With `max_attempts` given, a try that began (a task of the message's own notes it:
    note_try_begun) and never ended counts as an attempt, once: its handling crashed its worker
    (or hung it, and the worker ended itself for it: tasks/hung_tasks.py) and recorded no
    failure, and would otherwise be handed over, and crash a worker, every sweep for ever. One
    that reaches `max_attempts` so is parked instead (and not returned), its last error kept, and
    said once the caller's transaction has committed.
    Nothing else is counted: a task that never began may wait in a worker's memory yet (taken
    from the queue ahead of its turn), or have been lost with a worker that crashed for another
    message's sake. Without `max_attempts` (while dispatched tasks wait in the queue), nothing is
    counted, and an open try stays on record for a later sweep.

    With `backoff_at_most` given (while dispatched tasks wait in the queue too), a message handed
    over or tried before is taken only once it has waited since as long as it had waited by then
    (its `last_attempt_at` less its `received_at`), or `backoff_at_most` (a message replayed long
    after it came), whichever is less: see the module's docstring.
    """
    now = now or database_now(session)
    claimed = session.execute(_CLAIM_STALLED, {
        "cutoff": now - min_age, "now": now, "limit": limit,
        "counting": 1 if max_attempts else 0, "max_attempts": max_attempts or 0,
        "backoff_at_most": backoff_at_most or timedelta(0),
        "gave_up": _GAVE_UP.format(max_attempts)})
    stalled = []
    for message_id, attempts, parked, request_id in claimed:
        if parked:
            say_once_committed(session, log, logging.ERROR, request_id,
                               "parked inbox message %s: %s", message_id,
                               _GAVE_UP.format(attempts))
        else:
            stalled.append(StalledMessage(message_id, attempts))
    return stalled


def unmark_unsent(session: Session, message_ids: list[uuid.UUID], marked_at: datetime) -> None:
    """Clear the mark of messages marked handed over at `marked_at` (by a claim here, or a replay)
    whose dispatch could not be sent, Redis away: the sweeper then takes them at its next sweep,
    as it does a message never handed over. Marked, they would wait out what a message handed
    over earns while tasks wait, an hour for one replayed long after it came, for a dispatch that
    never went.

    Only a mark still the one written at `marked_at` is cleared: whatever has touched the message
    since wrote its own (a try begun, a failure recorded, the message handled or parked, another
    sweep's claim), and is left as it is: a failed try's retry due in seconds would otherwise be
    handed over beside it. A row a handler holds locked is left to it."""
    session.execute(_UNMARK_UNSENT, {"message_ids": [str(m) for m in message_ids],
                                     "marked_at": marked_at})


# (`marked_at` is passed as it was written, read from the database's clock (database_now):
# timestamptz keeps its microseconds, and so does the datetime read, so the two compare equal.)
_UNMARK_UNSENT = text("""
UPDATE inbox_messages SET last_attempt_at = NULL
WHERE message_id IN (SELECT message_id FROM inbox_messages
                     WHERE message_id = ANY(CAST(:message_ids AS uuid[]))
                           AND last_attempt_at = :marked_at
                     FOR UPDATE SKIP LOCKED)""")

_GAVE_UP = ("tried {} times and never handled: its handling may crash or hang the worker (its"
            " tries were lost with it)")
# `lost`: a try that began and never ended, counted (and so closed) when sweeping with `counting`.
_CLAIM_STALLED = text("""
WITH stalled AS (
    SELECT message_id, CASE WHEN :counting = 1 AND try_open THEN 1 ELSE 0 END AS lost
    FROM inbox_messages
    WHERE processed_at IS NULL AND parked_at IS NULL AND received_at < :cutoff
          AND (last_attempt_at IS NULL
               OR (last_attempt_at < :cutoff
                   AND :now - last_attempt_at >= least(last_attempt_at - received_at,
                                                      :backoff_at_most)))
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
