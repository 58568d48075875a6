"""The operator's parked outbox rows: listed, handed back to the relay, or discarded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from shared.outbox.relaying import PARKED_ROWS, UNKNOWN_TOPIC_ERROR_BEGINS
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
    by reading the table: for an operator, not the relay; a statement after the one that lists
    them, so a row replayed or parked in between may be counted a moment apart)."""
    rows = session.execute(_PARKED, {"limit": limit}).all()
    waiting = _waiting_behind(session, rows)
    return [ParkedOutboxMessage(*row[1:], waiting_behind=waiting.get(row.id, 0)) for row in rows]


_PARKED = text(f"""
SELECT id, message_id, topic, key, type, parked_at, attempts, last_error
FROM outbox_messages WHERE {PARKED_ROWS}
ORDER BY parked_at DESC, id DESC LIMIT :limit""")


def _waiting_behind(session: Session, parked) -> dict[int, int]:
    """How many rows wait behind each of the `parked` rows (by id; a row of no key holds none
    back): the later rows of its topic and key that are not parked themselves.

    Read in one walk of the rows after the oldest of them, whatever their number: no index finds
    the rows of a topic and key that were never tried (the refused rows' index holds the tried
    ones alone), and a count for each parked row (a subquery, or a join the planner may make a
    nested loop of, as it estimates the parked rows at one) walked the whole backlog for each: with
    80 parked and three million rows behind, `list --outbox` ran past the statement timeout. Their
    keys are given as constants, which PostgreSQL looks a row's key up in by hashing, and the
    count is a window over the rows of those keys with the parked rows among them, by topic and
    key, newest first: a listed row replayed between the two reads is not counted behind itself."""
    keyed = [row for row in parked if row.key is not None]
    if not keyed:
        return {}
    return dict(session.execute(_WAITING_BEHIND, {
        "ids": [row.id for row in keyed], "topics": [row.topic for row in keyed],
        "keys": [row.key for row in keyed], "their_keys": sorted({row.key for row in keyed}),
        "first_id": min(row.id for row in keyed)}).all())


_WAITING_BEHIND = text("""
SELECT id, waiting_behind FROM (
    SELECT id, parked, count(*) FILTER (WHERE NOT parked)
                           OVER (PARTITION BY topic, key ORDER BY id DESC) AS waiting_behind
    FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id, unnest(CAST(:topics AS text[])) AS topic,
                 unnest(CAST(:keys AS text[])) AS key, true AS parked
          UNION ALL
          SELECT id, topic, key, false FROM outbox_messages
          WHERE id > :first_id AND parked_at IS NULL AND key = ANY(:their_keys)
                AND NOT id = ANY(CAST(:ids AS bigint[]))
         ) AS of_their_keys
) AS counted WHERE parked""")


def unpark_outbox_messages(session: Session,
                           message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Hand parked rows (every one when `message_ids` is None) back to the relay, to be sent
    again in their place, before the rows behind them (once what made the broker refuse the
    message, too large or invalid, is mended; one it still refuses so is parked again); returns
    their ids. The relay is woken as the caller's transaction commits."""
    return [row.message_id for row in _change_parked_rows(session, _UNPARK, message_ids)]


class NotOfTheTopic(Exception):
    """Rows to be sent on to a topic hold events of types that do not go there: nothing is."""

    def __init__(self, topic: str, event_types: list[str]):
        super().__init__(f"rows to be sent on to {topic} hold {', '.join(event_types)} events,"
                         f" which do not go there: name the rows of its events only")
        self.event_types = event_types


def redirect_parked_outbox_messages(session: Session, message_ids: list[uuid.UUID] | None,
                                    topic: str, relayed_topics: list[str],
                                    event_types: frozenset[str],
                                    from_topic: str | None = None) -> list[uuid.UUID]:
    """Hand rows parked for a topic that is not among `relayed_topics` (every one when `message_ids`
    is None; only those of `from_topic` when given) back to the relay to be sent to `topic`
    instead, each with the rows waiting behind it (its old topic and key, written after it), so
    that those go on after it, in their order, rather than each be parked in turn; returns the
    parked rows' ids. (A row parked for the broker's answer about its record, too large or
    invalid, is left alone: its topic is the shop's.) Raises
    NotOfTheTopic, changing nothing, if any of those rows is of a type not among `event_types`,
    the ones that go to `topic`: a service's rows sent on to a topic it reads itself, or to
    another of its own, would hand its consumers events they never take. The relay is woken as
    the caller's transaction commits."""
    chosen, params = _named(message_ids)
    params.update(topic=topic, relayed_topics=list(relayed_topics),
                  event_types=sorted(event_types))
    if from_topic is not None:
        chosen, params["from_topic"] = chosen + " AND topic = :from_topic", from_topic
    to_send_on = session.execute(text(_TO_SEND_ON.format(chosen=chosen)), params).all()
    if not to_send_on:
        return []
    params.update(_sent_on_with_the_rows_behind(to_send_on))
    # One statement, so one snapshot: the rows it moves are the rows whose types it checked. (As
    # a check and then the move, a row of the old topic committed between the two, parked or
    # waiting behind, was moved unchecked, whatever its type.)
    outcome = session.execute(text(_REDIRECT_UNLESS_OF_OTHER_TYPES.format(chosen=chosen)),
                              params).all()
    stray = sorted(row.stray_type for row in outcome if row.stray_type is not None)
    if stray:
        raise NotOfTheTopic(topic, stray)
    return _relay_woken_for(session, [row.message_id for row in outcome])


# The parked rows that redirect_parked_outbox_messages sends on, read first, unlocked, so that
# the statement that sends them on is given them as constants (_sent_on_with_the_rows_behind).
_TO_SEND_ON = """
SELECT id, key FROM outbox_messages
WHERE """ + PARKED_ROWS + """ AND topic <> ALL(:relayed_topics){chosen}"""


def _sent_on_with_the_rows_behind(to_send_on) -> dict:
    """The parameters by which _REDIRECT_UNLESS_OF_OTHER_TYPES takes the parked rows
    `to_send_on` (id, key) and finds the rows waiting behind them: their ids, their keys, and the
    first of their ids. Given as constants, as _waiting_behind gives them, for the reason it says:
    the rows behind matched to the parked ones in a join, a nested loop as the planner estimates
    the parked rows at one, every later row was walked for each parked row, twice (to check its
    type, then to move it); 1,000 parked with 999,000 rows behind them ran past the statement
    timeout, nothing sent on."""
    return {"ids": [row.id for row in to_send_on],
            "their_keys": sorted({row.key for row in to_send_on if row.key is not None}),
            "first_id": min(row.id for row in to_send_on)}


def why_not_sent_on(session: Session, message_ids: list[uuid.UUID],
                    relayed_topics: list[str]) -> dict[uuid.UUID, str]:
    """Why `replay --to-topic` sent none of the rows `message_ids` on, each in a few words with
    what to do instead (for an operator: after redirect_parked_outbox_messages left them)."""
    rows = {row.message_id: row for row in session.execute(text(
        "SELECT message_id, topic, parked_at, last_error FROM outbox_messages"
        " WHERE message_id = ANY(:message_ids)"), {"message_ids": message_ids})}
    why = {}
    for message_id in message_ids:
        row = rows.get(message_id)
        if row is None:
            why[message_id] = "no such outbox row: sent, discarded, or never written"
        elif row.parked_at is None:
            why[message_id] = "not parked"
        elif row.topic not in relayed_topics:
            why[message_id] = f"still parked for {row.topic} (parked as it ran?): run it again"
        elif (row.last_error or "").startswith(UNKNOWN_TOPIC_ERROR_BEGINS):
            # (A newer release's row, parked by a relay of the release before in a rolling upgrade.)
            why[message_id] = (f"parked for a topic that is now the shop's ({row.topic}): replay"
                               " it without --to-topic")
        else:
            # (Refused by the broker for its record: too large, or invalid; its error says which.)
            why[message_id] = (f"parked for the broker's answer about it, its topic the shop's"
                               f" ({row.topic}): replay it without --to-topic once what made the"
                               " broker refuse it is mended")
    return why


def parked_topics_not_relayed(session: Session, relayed_topics: list[str]) -> list[str]:
    """The topics not among `relayed_topics` that parked rows name (for `replay --all --to-topic`,
    which sends the rows of one such topic on)."""
    return list(session.scalars(text(
        f"SELECT DISTINCT topic FROM outbox_messages WHERE {PARKED_ROWS}"
        " AND topic <> ALL(:relayed_topics) ORDER BY topic"),
        {"relayed_topics": list(relayed_topics)}))


@dataclass(frozen=True)
class ParkedRowPlace:
    """A parked row's place in the order the rows were written (its id), for the batches of
    `replay --all` and `discard --all` (shared.parked_batches)."""
    id: int
    message_id: uuid.UUID


@dataclass(frozen=True)
class LastParkedRow:
    """Where a run over every parked row stops: the place of the last written of the rows parked
    as it was read, and the database's clock then, `parked_by`. A row is stamped parked by the
    database's clock as the relay's statement parks it (relaying._PARK), so every row parked then
    was parked by it; one parked later, whenever it was written, is past the bound: `replay
    --all` or `discard --all` takes no row parked once it has begun, written before the last
    parked or after it (a bound of ids alone took the rows written before it)."""
    id: int
    message_id: uuid.UUID
    parked_by: datetime


def last_parked_outbox_row(session: Session) -> LastParkedRow | None:
    """The bound of a run over every parked row that begins now (None while none is parked)."""
    row = session.execute(text(
        f"SELECT id, message_id, clock_timestamp() FROM outbox_messages WHERE {PARKED_ROWS}"
        " ORDER BY id DESC LIMIT 1")).one_or_none()
    return row and LastParkedRow(*row)


def parked_outbox_batch(session: Session, through: LastParkedRow, after: ParkedRowPlace | None,
                        size: int) -> list[ParkedRowPlace]:
    """The places of the first `size` parked rows after `after` (from the first when None), and
    within `through` (written up to its row, parked by its time), in the order they were written:
    one transaction's share of them all."""
    return [ParkedRowPlace(*row) for row in session.execute(_PARKED_BATCH, {
        "through": through.id, "parked_by": through.parked_by,
        "after": 0 if after is None else after.id, "size": size})]


# (Row ids start at 1: after 0 is from the first.) Read, as the last parked row is, off the index
# of the parked rows alone by id (ix_outbox_messages_parked_by_id): a batch reads its own rows,
# not the rows written between them nor the refused rows waiting for their next try (the time
# each was parked read off its row: a batch's rows are read to be changed all the same).
_PARKED_BATCH = text(f"""
SELECT id, message_id FROM outbox_messages
WHERE {PARKED_ROWS} AND id > :after AND id <= :through AND parked_at <= :parked_by
ORDER BY id LIMIT :size""")


def parked_outbox_rows_among(session: Session, message_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of the rows `message_ids` are parked now (by their ids, through their unique
    constraint's index)."""
    return set(session.scalars(text(
        f"SELECT message_id FROM outbox_messages WHERE {PARKED_ROWS}"
        " AND message_id = ANY(:message_ids)"), {"message_ids": message_ids}))


def discard_parked_outbox_messages(session: Session,
                                   message_ids: list[uuid.UUID] | None) -> list[Row]:
    """Delete parked rows (every one when `message_ids` is None), never to be sent, so that the
    rows behind them go; returns a row for each, with its message_id, type and order_id: its
    payload's, as text, None when it holds none. Read by the statement that deletes them, so they
    are the rows it deleted, whatever was parked or replayed as it ran. The relay is woken as the
    caller's transaction commits."""
    return _change_parked_rows(session, _DISCARD, message_ids, returning=(
        "message_id, type, envelope -> 'payload' ->> 'order_id' AS order_id"))


def _change_parked_rows(session: Session, statement: str, message_ids: list[uuid.UUID] | None,
                        returning: str = "message_id") -> list[Row]:
    """Run `statement` on the parked rows named (every one when `message_ids` is None); returns a
    row of the `returning` columns (their id alone unless given) for each, and has the relay woken
    when the transaction commits."""
    chosen, params = _named(message_ids)
    return _relay_woken_for(session, session.execute(
        text(f"{statement}{chosen} RETURNING {returning}"), params).all())


def _named(message_ids: list[uuid.UUID] | None) -> tuple[str, dict]:
    """The condition on the parked rows that picks `message_ids` (every one when None), and its
    parameters."""
    if message_ids is None:
        return "", {}
    return " AND message_id = ANY(:message_ids)", {"message_ids": message_ids}


_Changed = TypeVar("_Changed")


def _relay_woken_for(session: Session, changed: list[_Changed]) -> list[_Changed]:
    """`changed`, the rows handed back or deleted (their ids, or rows holding them); if any, the
    relay is woken as the transaction commits (NOTIFY is sent at commit)."""
    if changed:
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": OUTBOX_CHANNEL})
    return changed


# One statement, so one snapshot: the rows it moves are the rows whose types it checked (a row
# committed after it began is neither checked nor moved; one the snapshot saw and another
# transaction changed since is moved only if it still meets the conditions it was checked under).
# The two updates never meet on a row: the rows behind are not parked, the chosen rows are. The
# chosen rows are those read just before (_TO_SEND_ON), by id, that are still parked as it runs
# (one parked between the two is left parked, as one parked after it is).
#
# The rows behind are read in one walk of the rows after the first chosen one, whatever their
# number (no join of them to the chosen rows, which the planner may make a nested loop of: see
# _sent_on_with_the_rows_behind): the rows of the chosen rows' keys, given as constants, which
# PostgreSQL looks a row's key up in by hashing, told behind a chosen row or not by a window over
# them and the chosen rows, by topic and key, in the order written. Each is then moved by its id.
#
# Its result: a row per parked row handed back (message_id; stray_type NULL), or else a row per
# type that does not go to the topic (stray_type; message_id NULL); never both kinds, as both
# updates are done only when there is no such type.
_REDIRECT_UNLESS_OF_OTHER_TYPES = """
-- The parked rows to send on, locked until the transaction ends.
WITH chosen AS (
    SELECT id, topic, key, type FROM outbox_messages
    WHERE """ + PARKED_ROWS + """ AND topic <> ALL(:relayed_topics)
          AND id = ANY(CAST(:ids AS bigint[])){chosen}
    FOR UPDATE),
-- The rows waiting behind them: their topic and key, a later id, not parked.
behind AS (
    SELECT id, topic, type FROM (
        SELECT id, topic, type, is_chosen,
               bool_or(is_chosen) OVER (PARTITION BY topic, key ORDER BY id) AS after_a_chosen
        FROM (SELECT id, topic, key, type, true AS is_chosen FROM chosen
              UNION ALL
              SELECT id, topic, key, type, false FROM outbox_messages
              WHERE id > :first_id AND parked_at IS NULL AND key = ANY(:their_keys)
             ) AS of_their_keys
    ) AS placed WHERE after_a_chosen AND NOT is_chosen),
-- The types that do not go to the topic, of the chosen rows and of the rows waiting behind them.
of_other_types AS (
    SELECT DISTINCT type FROM (
        SELECT type FROM chosen
        UNION ALL
        SELECT type FROM behind) AS sent_on
    WHERE type <> ALL(:event_types)),
-- The rows waiting behind, moved to the topic, only if no row is of another type.
moved_behind AS (
    UPDATE outbox_messages AS later SET topic = :topic FROM behind
    WHERE later.id = behind.id AND later.topic = behind.topic AND later.parked_at IS NULL
          AND NOT EXISTS (SELECT FROM of_other_types)),
-- The chosen rows, moved to the topic and handed back to the relay, on the same condition.
redirected AS (
    UPDATE outbox_messages AS parked SET topic = :topic, parked_at = NULL FROM chosen
    WHERE parked.id = chosen.id AND NOT EXISTS (SELECT FROM of_other_types)
    RETURNING parked.message_id)
-- The ids of the rows handed back, or else the types that kept every row where it was.
SELECT message_id, NULL AS stray_type FROM redirected
UNION ALL
SELECT NULL, type FROM of_other_types"""
_UNPARK = f"UPDATE outbox_messages SET parked_at = NULL WHERE {PARKED_ROWS}"
_DISCARD = f"DELETE FROM outbox_messages WHERE {PARKED_ROWS}"
