"""The relay's side: outbox rows read in order, sent, deleted; refused ones retried or parked."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from shared.db import limit_lifted
from shared.request_context import REQUEST_ID_KAFKA_HEADER

# What the relay reads of a row, as plain tuples (see RelayRow); the envelope as text, not parsed.
RELAY_SELECT = """
SELECT id, topic, key, message_id::text, type, request_id, envelope::text FROM outbox_messages"""
# The oldest rows that may go: not parked, not waiting to be tried again, and not behind a row
# with their topic and key that is (a row without a key has no order to keep). Such rows were
# refused, and have an index of their own (attempts > 0), empty but for them. The read first looks
# at that index once (an InitPlan: the question names no row of the read), and only a little of it,
# REFUSED_LOOKED_AT entries at most: when those are all it holds and none of them is parked or
# waiting, as nearly always, no row read is looked up at all (PostgreSQL evaluates the arms of an
# OR in order). Otherwise each row read is looked up there: OFFSET 0 keeps that check a lookup,
# whatever the table's statistics say. (As a join planned on statistics taken while no row was
# refused, it compared each row read with every refused row: with 20,000 refused, a read of 5,000
# rows took 3.7 s instead of 13 ms. The lookups cost a read of 5,000 rows about 4 ms, a third of it,
# which the first look saves while the index is empty; bounded, it costs no more than they do when
# the index is not: after a long outage a million refused rows may all be due, none waiting, and a
# look at all of them took 110 ms a read.) While refused rows wait, a read walks over them and the
# rows behind them: 1.3 s a read with a million; so after a slow read that found all it could send,
# the leader reads again only once something may have changed for those rows (tasks/relay.py:
# _StandingBacklog, with newer_row_may_go and first_refused_row_due_in below).
REFUSED_LOOKED_AT = 1000
# (The condition on its own, `waiting` being the row: _NEWER_ROW_MAY_GO asks it too.)
_MAY_GO = f"""parked_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())
  AND ((SELECT count(*) <= {REFUSED_LOOKED_AT}
               AND count(*) FILTER (WHERE parked_at IS NOT NULL OR next_attempt_at > now()) = 0
        FROM (SELECT parked_at, next_attempt_at FROM outbox_messages
              WHERE attempts > 0 LIMIT {REFUSED_LOOKED_AT + 1}) AS refused)
       OR NOT EXISTS (
         SELECT FROM outbox_messages AS refused
         WHERE refused.attempts > 0 AND refused.topic = waiting.topic
               AND refused.key = waiting.key AND refused.id < waiting.id
               AND (refused.parked_at IS NOT NULL OR refused.next_attempt_at > now())
         OFFSET 0))"""
CLAIM_ROWS = RELAY_SELECT + f""" AS waiting
WHERE {_MAY_GO}
ORDER BY id LIMIT %(batch_size)s"""

# How long a row the broker refused waits before it is tried again: this long after its first
# refusal, twice as long after each one after, up to the longest wait. Waiting, it is passed over,
# with the later rows of its key, and the rows behind go on; once its time has come, it is read
# with the rows of its key behind it, in order, as any row is. (So after a broker outage a row
# waits up to the longest wait more: the price of not trying rows refused for what they are, a
# topic the relay may not write to, say, more often than that.)
FIRST_RETRY_AFTER_SECONDS = 1.0
LONGEST_RETRY_AFTER_SECONDS = 30.0

# (id, topic, key, message_id, type, request_id, envelope): a row as RELAY_SELECT reads it.
RelayRow = tuple[int, str, str | None, str, str, str | None, str]


def relay_headers(message_id: str, event_type: str, request_id: str | None) -> dict[str, str]:
    """The Kafka headers a row is sent with: what a consumer may want before it parses the value
    (the message id it dedups by, the type) and the request id to log."""
    headers = {"message_id": message_id, "type": event_type}
    if request_id:
        headers[REQUEST_ID_KAFKA_HEADER] = request_id
    return headers


@dataclass(frozen=True)
class Refusal:
    """Why a row was not acknowledged. `held`: refused for what the message is, not for the
    broker's state (a message too large ever to be sent, one whose record the broker's validation
    refuses, one naming a topic that is not the shop's, or a row held back behind one), so
    nothing follows about the broker. `park`: the row's own message can never be sent as it is
    (too large, an invalid record, or to a topic that is not the shop's); it is parked rather
    than tried again (a row held back behind it is `held` only, and goes as soon as the parked
    row is replayed and sent, or discarded). Every other refusal counts against the broker, and
    the row is tried again after its wait (FIRST_RETRY_AFTER_SECONDS). `answered`: of those, the
    broker reached refused the row itself, for its topic or its record (a topic the relay may not
    write to or that does not exist, a timestamp out of the topic's bounds), so the relay's way
    to the broker is sound; a refusal without an answer (no acknowledgement in time, a broken
    connection) may be the relay's own way to the broker failing, and only those count towards
    the leader stepping down (tasks/relay.py)."""

    error: str
    held: bool = False
    park: bool = False
    answered: bool = False


@dataclass(frozen=True)
class RelayResult:
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    held: int = 0  # of the failed, those refused for what the message is (see Refusal)
    parked: int = 0  # of the held, those parked (the rest were behind them)
    # For the leader's count towards stepping down (tasks/relay.py): the rows read, and of those
    # refused for the broker's sake, the ones it refused with an answer and those it left without
    # one (see Refusal).
    claimed_ids: frozenset[int] = frozenset()
    answered_ids: frozenset[int] = frozenset()
    unanswered_ids: frozenset[int] = frozenset()
    read_seconds: float = 0.0  # how long the read took (CLAIM_ROWS and its rows fetched)

    @property
    def refused_by_the_broker(self) -> int:
        """Failed rows a broker was asked for (refused, or no answer in time)."""
        return self.failed - self.held

    @property
    def unanswered(self) -> bool:
        """Whether the broker took none of the batch and left rows of it without an answer: the
        only kind of batch that says the relay may not reach the broker (see Refusal). A row it
        answered for beside them says nothing for the others: one broker of several may answer
        while the partitions' leaders are out of reach."""
        return not self.sent and bool(self.unanswered_ids)


# Publishes rows and waits for the broker's answers: returns why each row the broker did not
# acknowledge was refused (the rows not named were acknowledged).
SendBatch = Callable[[list[RelayRow]], dict[int, Refusal]]


def relay_pending_outbox(cursor, send_batch: SendBatch, batch_size: int) -> RelayResult:
    """Publish one batch of rows, oldest first, and delete the ones the broker acknowledged;
    park the ones that can never be sent as they are, count an attempt for the others refused
    (and have the ones the broker refused wait for their next try).

    For the database's one relay: the leader passes a driver cursor of its own connection, in
    autocommit, so a batch costs two statements (read, delete; see _delete_rows for when the
    delete takes two) and no transaction around them; it runs at every wake-up, thousands of rows
    a second.
    """
    started = time.monotonic()
    cursor.execute(CLAIM_ROWS, {"batch_size": batch_size})
    rows: list[RelayRow] = cursor.fetchall()
    read_seconds = time.monotonic() - started
    if not rows:
        return RelayResult(read_seconds=read_seconds)
    refused = send_batch(rows)
    sent_ids = [row[0] for row in rows if row[0] not in refused]
    if sent_ids:
        _delete_rows(cursor, sent_ids)
    row_ids_by_refusal: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row_id, refusal in refused.items():
        statement = _PARK if refusal.park else _COUNT_HELD if refusal.held else _COUNT_REFUSAL
        row_ids_by_refusal[statement, refusal.error].append(row_id)
    for (statement, error), row_ids in row_ids_by_refusal.items():
        cursor.execute(statement, {"row_ids": row_ids, "error": error[:2000],
                                   "first_wait": FIRST_RETRY_AFTER_SECONDS,
                                   "longest_wait": LONGEST_RETRY_AFTER_SECONDS})
    return RelayResult(claimed=len(rows), sent=len(sent_ids), failed=len(refused),
                       held=sum(refusal.held for refusal in refused.values()),
                       parked=sum(refusal.park for refusal in refused.values()),
                       claimed_ids=frozenset(row[0] for row in rows),
                       answered_ids=frozenset(row_id for row_id, refusal in refused.items()
                                              if refusal.answered and not refusal.held),
                       unanswered_ids=frozenset(row_id for row_id, refusal in refused.items()
                                                if not refusal.answered and not refusal.held),
                       read_seconds=read_seconds)


def vacuum_outbox(cursor) -> None:
    """Reclaim the space of the rows the relay has deleted; for the database's one relay, on its
    autocommit connection (VACUUM cannot run in a transaction).

    A deleted row stays in the table and in its indexes, as a dead version, until a VACUUM, and
    the relay's read walks the primary key from its oldest end, over every dead entry on the way:
    with 100,000 rows deleted since the last VACUUM, a read that finds one row cost PostgreSQL
    0.5 ms (276 index pages) against 0.01 ms (2) once they were reclaimed. Autovacuum, where it
    runs at all, comes by a table at most once a minute; the relay, which makes the dead rows,
    reclaims them as it goes, for a few milliseconds each time. When a VACUUM of the table is
    already running (autovacuum's, say), this one skips it rather than wait, and leaves the
    reclaiming to it. It runs without the session's statement limit (shared.db.SESSION_LIMITS:
    30 s), which then holds again: after a long broker outage the table holds millions of dead
    rows, and a VACUUM cancelled at the limit would come back every tasks.relay.VACUUM_AFTER_ROWS
    rows sent, cancelled again each time, with the leader's lead.
    """
    with limit_lifted(cursor.execute, "statement_timeout"):
        cursor.execute("VACUUM (SKIP_LOCKED) outbox_messages")


def _delete_rows(cursor, row_ids: list[int]) -> None:
    """Delete the rows `row_ids` (ascending): through a backlog, every row between the first and
    the last, which one walk along the primary key deletes at a quarter to a third of the cost of
    looking each id up (measured on 100,000 rows in batches of 5,000). The walk deletes only if
    the rows it finds are as many as the rows named (those are all in the table, and all in the
    range, so then they are the very rows it finds): a row in the range that was not sent (a
    refused or parked one, one waiting to be tried again or held back behind a refused one, or one
    committed late under a lower id) makes it delete nothing, and the rows are then deleted by
    their ids, a second statement: under a steady load now and then, when another transaction's
    row between them commits while they are out; while rows are refused, for every batch whose
    range holds them or rows waiting behind them."""
    cursor.execute(_DELETE_RANGE_IF_ONLY_THOSE, {"first": row_ids[0], "last": row_ids[-1],
                                                 "rows": len(row_ids)})
    if cursor.rowcount != len(row_ids):
        cursor.execute(_DELETE_ROWS, {"row_ids": row_ids})


# The count and the delete read the table in one statement, so through one snapshot: they see the
# same rows (a row committed after the snapshot is seen by neither, and so not deleted).
_DELETE_RANGE_IF_ONLY_THOSE = """
WITH in_range AS (SELECT count(*) AS rows FROM outbox_messages
                  WHERE id BETWEEN %(first)s AND %(last)s)
DELETE FROM outbox_messages
WHERE id BETWEEN %(first)s AND %(last)s AND (SELECT rows FROM in_range) = %(rows)s"""
# One array parameter, however many rows: `id = ANY(%s)` rather than thousands of IN values.
_DELETE_ROWS = "DELETE FROM outbox_messages WHERE id = ANY(%(row_ids)s)"
# (`attempts` on the right of SET is the count before this refusal.)
_COUNT_REFUSAL = """
UPDATE outbox_messages SET attempts = attempts + 1, last_error = %(error)s,
    next_attempt_at = now() + interval '1 second'
        * least(%(first_wait)s * power(2, least(attempts, 30)), %(longest_wait)s)
WHERE id = ANY(%(row_ids)s)"""
_COUNT_HELD = ("UPDATE outbox_messages SET attempts = attempts + 1, last_error = %(error)s,"
               " next_attempt_at = NULL WHERE id = ANY(%(row_ids)s)")
_PARK = ("UPDATE outbox_messages SET attempts = attempts + 1, last_error = %(error)s,"
         " next_attempt_at = NULL, parked_at = now() WHERE id = ANY(%(row_ids)s)")

# The parked rows, as a condition that their own index (ix_outbox_messages_parked_by_id, by id),
# and the refused rows' index too, answers (a parked row counted an attempt as it was parked).
PARKED_ROWS = "attempts > 0 AND parked_at IS NOT NULL"
# How the error of a row parked for its topic begins (shared.outbox.publishing.UNKNOWN_TOPIC_ERROR),
# whichever release's relay parked it: tells it from one parked for the broker's answer about its
# record (too large, invalid: shared.outbox.parked).
UNKNOWN_TOPIC_ERROR_BEGINS = "not sent: its topic"


def refused_rows_wait(cursor) -> bool:
    """Whether rows the broker refused wait to be tried again (read off the refused rows' index)."""
    cursor.execute("SELECT EXISTS (SELECT FROM outbox_messages"
                   " WHERE attempts > 0 AND next_attempt_at IS NOT NULL)")
    return cursor.fetchone()[0]


# For the leader while its reads walk a standing backlog (tasks/relay.py: _StandingBacklog).

def rows_were_refused(cursor) -> bool:
    """Whether any row the broker refused is still there (read off the refused rows' index)."""
    cursor.execute("SELECT EXISTS (SELECT FROM outbox_messages WHERE attempts > 0)")
    return cursor.fetchone()[0]


def newest_row_id(cursor) -> int:
    """The id of the newest row there is (0 with none), read off the end of the primary key."""
    cursor.execute("SELECT coalesce(max(id), 0) FROM outbox_messages")
    return cursor.fetchone()[0]


def newer_row_may_go(cursor, newest_id: int) -> bool:
    """Whether a row newer than `newest_id` may go, by CLAIM_ROWS's own condition: a walk of the
    rows after it only, which stops at the first that may."""
    cursor.execute(_NEWER_ROW_MAY_GO, {"newest_id": newest_id})
    return cursor.fetchone()[0]


_NEWER_ROW_MAY_GO = f"""
SELECT EXISTS (SELECT FROM outbox_messages AS waiting WHERE id > %(newest_id)s AND {_MAY_GO})"""


def first_refused_row_due_in(cursor) -> float | None:
    """In how many seconds (0 or fewer: now) the first refused row that holds rows back may be
    tried again; None if none waits for its next try. Only the first refused row of each topic and
    key counts (and every refused row without a key): the later ones of its key, though their own
    wait may end sooner (a row's wait doubles with its own refusals), may not go before it. Read
    off the refused rows' index, all of it (parked rows and their keys wait for an operator)."""
    cursor.execute(_FIRST_REFUSED_ROW_DUE_IN)
    return cursor.fetchone()[0]


_FIRST_REFUSED_ROW_DUE_IN = """
SELECT extract(epoch FROM min(next_attempt_at) - now())::float FROM (
    (SELECT DISTINCT ON (topic, key) parked_at, next_attempt_at FROM outbox_messages
     WHERE attempts > 0 AND key IS NOT NULL ORDER BY topic, key, id)
    UNION ALL
    SELECT parked_at, next_attempt_at FROM outbox_messages WHERE attempts > 0 AND key IS NULL
) AS first_of_their_key WHERE parked_at IS NULL"""


def count_rows_that_may_go(cursor) -> int:
    """How many rows the relay may send now, by CLAIM_ROWS's own condition: neither parked, nor
    waiting out a refusal, nor behind a row of their topic and key that is (devstack's drain at a
    stop waits for these, not for rows that cannot go yet)."""
    cursor.execute(f"SELECT count(*) FROM outbox_messages AS waiting WHERE {_MAY_GO}")
    return cursor.fetchone()[0]


def count_parked_outbox_messages(cursor) -> int:
    """How many rows are parked: for the relay to remind of them (read off the parked rows'
    index)."""
    cursor.execute(f"SELECT count(*) FROM outbox_messages WHERE {PARKED_ROWS}")
    return cursor.fetchone()[0]
