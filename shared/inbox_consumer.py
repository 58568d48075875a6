"""The Kafka side of the inbox: poll a batch, store it, commit the offsets, hand new messages on.

The steps are kept apart so the commit point is plain to see and test: an offset is committed only
after the inbox rows for every record below it have committed in PostgreSQL. A crash anywhere
before the offset commit means those records are read again and the inbox drops the repeats. For
the same reason the consumer neither waits for the broker to confirm an offset commit (one that is
lost costs a re-read, never a message) nor commits after every batch: it commits what it has
stored at most once per COMMIT_INTERVAL_SECONDS (as Kafka's own auto-commit does, every five
seconds by default), when it stops, and when the group takes partitions away from it. The
broker's answer comes later, through the client's on_commit (note_commit_result): an offset whose
commit failed is committed again with the next, unless a later one has been stored or sent since,
or its partition taken away. Failed commits are said as an outage is (a coordinator away fails
one a second): once as they begin, then once a minute while they last (shared.outage_log); so is
each partition held by a record batch the client cannot read, and fetches again and again, never
past it (shared.unreadable_batches).

A step that fails is retried a second later, but for a partition that could not be rewound past
mending (CannotRewind), which ends the loop. One that failed on a lost database connection (a
restart, a failover) is an outage the consumer waits out, not a fault: it is said once as it
begins, then once a minute while it lasts, not for each step (shared.db.DatabaseOutageLog).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import psycopg2
from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError,
                             KafkaException, TopicPartition)

from shared.db import DatabaseOutageLog
from shared.inbox.storing import ConsumedRecord, insert_records
from shared.outage_log import OutageLog, OutageWords
from shared.task_queues import QUEUES_UNREACHABLE
from shared.unreadable_batches import UnreadableBatches, holds_its_partition

log = logging.getLogger(__name__)

StoreBatch = Callable[[list[ConsumedRecord]], list[uuid.UUID]]
Dispatch = Callable[[list[uuid.UUID]], None]

# At low rates a batch holds a message or two, and committing after each was a broker request per
# message (on Tansu about 0.15 ms of the broker's CPU each). At most this much stored work is read
# again after a crash or a rebalance.
COMMIT_INTERVAL_SECONDS = 1.0
# How long a consumer waits for its group's committed offsets, asked only to rewind partitions it
# had read nothing of, after a poll() or consume() that failed; asked again, when they could not be
# had, at most this often (each ask holds up the other partitions' reads up to this long).
_COMMITTED_TIMEOUT_SECONDS = 5.0


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# A coordinator away fails every commit, one a second: said as it begins, then once a minute.
_FAILED_COMMITS_WORDS = OutageWords(
    begun="%(what)s could not commit %(said)s",
    still="%(what)s: offset commits still failing after %(seconds).0f s, %(tries)d failed (the"
          " last could not commit %(said)s)",
    over="%(what)s: offset commits go through again after %(seconds).0f s, %(tries)d failed")


class CannotRewind(Exception):
    """A partition's seek failed other than Kafka's way (a KafkaException: the client not fetching
    it just then, sought again before each poll): the client closed under the consumer, or an
    offset it cannot take, a mistake in the code. No retry mends either, and the records from the
    rewind's offset on are unstored, the client reading on past them: paused and sought again for
    ever, the partition would wait while the worker looks well. So the loop ends (run() raises
    this, after committing what is stored if it still can, all of it below them: a closed client
    cannot, and those records are read again), and the worker stops to be started again
    (tasks/consumer.py): the group reads the partition on from its committed offset. Nothing is
    polled after it: a poll could hand on records past those unstored."""


def to_record(message) -> ConsumedRecord:
    """The record of a polled message. What a producer may have set oddly (headers, timestamp) is
    read so that it cannot raise: a record lost here would be skipped by the next offset commit."""
    return ConsumedRecord(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value(),
        headers=record_headers(message),
        timestamp=record_timestamp(message),
    )


def record_headers(message) -> dict[str, bytes]:
    """The record's headers with a value, or none if they cannot be read (a name not UTF-8)."""
    try:
        pairs = message.headers() or []
    except Exception as exc:
        log.warning("consumer: the headers of %s [%s] @ %s cannot be read (%r); storing it without",
                    message.topic(), message.partition(), message.offset(), exc)
        return {}
    return {name: value for name, value in pairs if value is not None}


def record_timestamp(message) -> datetime | None:
    """The record's timestamp, or None when it has none (or one no datetime can hold, past the
    year 9999): the producer's clock when it was produced (the relay leaves it to librdkafka), or
    the broker's on a topic that stamps at append."""
    kind, milliseconds = message.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE:
        return None
    try:
        return _EPOCH + timedelta(milliseconds=milliseconds)  # exact, where a float would round
    except OverflowError:
        return None


def to_position(message) -> ConsumedRecord:
    """Where a polled message sits, and nothing else of it (enough for first_offsets)."""
    return ConsumedRecord(message.topic(), message.partition(), message.offset(), None, None, {})


def next_offsets(records: list[ConsumedRecord]) -> list[TopicPartition]:
    """The offsets to commit after `records`: one past the highest record of each partition."""
    highest: dict[tuple[str, int], int] = {}
    for record in records:
        position = (record.topic, record.partition)
        highest[position] = max(highest.get(position, -1), record.offset)
    return [TopicPartition(topic, partition, offset + 1)
            for (topic, partition), offset in highest.items()]


def first_offsets(records: list[ConsumedRecord]) -> list[TopicPartition]:
    """Where to rewind to so that `records` are read again."""
    lowest: dict[tuple[str, int], int] = {}
    for record in records:
        position = (record.topic, record.partition)
        lowest[position] = min(lowest.get(position, record.offset), record.offset)
    return [TopicPartition(topic, partition, offset)
            for (topic, partition), offset in lowest.items()]


class InboxConsumer:
    """Runs the consume loop of one service until `stop()` is called."""

    def __init__(self, consumer: Consumer, topics: list[str], store_batch: StoreBatch,
                 dispatch: Dispatch, batch_size: int = 500, poll_timeout: float = 0.2,
                 commit_interval: float = COMMIT_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic, name: str = "the inbox consumer"):
        self._consumer = consumer
        self._topics = topics
        self._store_batch = store_batch
        self._dispatch = dispatch
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._commit_interval = commit_interval
        self._clock = clock
        self._stopping = threading.Event()
        # Per partition, the offset to commit: one past the last record stored in the inbox.
        self._stored: dict[tuple[str, int], int] = {}
        # Per partition, the highest offset sent in a commit, asynchronous or waited for: a failed
        # one below it is not put back (note_commit_result), or it would be committed after it
        # and move the group's position back (the answer to an asynchronous commit can come after
        # a later commit waited for: close() serves it, then revokes). Dropped as the partition is
        # revoked or lost: a failed commit of before must not be committed again over what a new
        # owner committed since.
        self._highest_sent: dict[tuple[str, int], int] = {}
        # Partitions revoked or lost and not assigned again: records of theirs still in hand (a
        # batch polled before the rebalance, stored after it) commit nothing, or this consumer
        # would commit an older offset over the one their new owner committed.
        self._given_up: set[tuple[str, int]] = set()
        # Partitions whose rewind failed (the client not fetching them just then, say), and the
        # offset to go back to: the seek is tried again before each poll, so that a partition
        # still assigned reads its skipped records again soon, not at the next rebalance (paused
        # till then: _paused).
        self._rewinds_due: dict[tuple[str, int], int] = {}
        # Per partition, where this consumer reads on from: one past the last record poll() handed
        # on, or where it was last rewound to. A poll() or consume() that raises has dropped what
        # it took (_rewind_what_the_client_dropped), and each partition goes back here. None for a
        # partition not read from since it was assigned: that one started from its committed
        # offset.
        self._reading_from: dict[tuple[str, int], int] = {}
        # Partitions a poll() or consume() that raised dropped records of whose committed offset,
        # where to rewind them to, could not be had: asked again before a poll (at most once every
        # _COMMITTED_TIMEOUT_SECONDS, from _look_up_again_at), and paused till then.
        self._lookups_due: set[tuple[str, int]] = set()
        self._look_up_again_at = clock()
        # Partitions paused till they are rewound (their lookup or their seek due): the client
        # fetches nothing more of theirs, and poll() hands on nothing it still held, so that no
        # record past the ones dropped is stored before them.
        self._paused: set[tuple[str, int]] = set()
        self._committed_at = clock()
        self._database_outage = DatabaseOutageLog(log, name, clock=clock)
        self._failed_commits = OutageLog(log, name, _FAILED_COMMITS_WORDS, clock=clock)
        self._unreadable = UnreadableBatches(log, name, clock=clock)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            self._consumer.subscribe(self._topics, on_assign=self._note_assigned,
                                     on_revoke=self._commit_revoked, on_lost=self._forget_lost)
            while not self._stopping.is_set():
                try:
                    if self.run_once():  # (records stored: the database is there)
                        self._database_outage.back()
                except CannotRewind:
                    raise
                except Exception as exc:
                    if not self._database_outage.said_if_lost(exc):
                        log.exception("inbox consumer step failed; retrying")
                    self._stopping.wait(1.0)
        finally:
            try:
                self.commit_stored(asynchronous=False)
            except Exception:  # (the client closed, say: the error that ended the loop is raised)
                log.exception("consumer: could not commit what is stored as it stops; it is read"
                              " again")
            finally:
                self._consumer.close()

    def run_once(self) -> int:
        """One pass of the pipeline; returns how many records it stored."""
        self._look_up_again()
        self._rewind_again()
        records = self.poll()
        new_ids = []
        if records:
            try:
                new_ids = self._store_batch(records)
            except Exception:
                # Nothing was stored, or only what the batch's first statement stored, which a
                # read again passes over (insert_records): rewind so the same records come back
                # on the next poll.
                self._rewind(first_offsets(records))
                raise
            for offset in next_offsets(records):
                where = (offset.topic, offset.partition)
                self._reading_from[where] = offset.offset
                if where not in self._given_up:
                    self._stored[where] = offset.offset
        if self._clock() - self._committed_at >= self._commit_interval:
            self.commit_stored()
        if new_ids:
            try:
                self._dispatch(new_ids)
            except QUEUES_UNREACHABLE as exc:
                # Stored, so not lost: the sweeper hands them over once the task queue is back
                # (Redis down, say: what Celery raises once its publish has retried), and storing
                # what comes next goes on meanwhile: while Redis refuses connections, each batch
                # stored costs its dispatch about 0.6 s (the publish tries again that long, to
                # ride out a blip: shared.celery_settings.PUBLISH_RETRY_POLICY); while it takes
                # them and never answers, two socket timeouts at most (10 s: the reply's on the
                # pooled connection, then a new connection's, celeryconfig), one (5 s) once no
                # connection is pooled. Any other error (a mistake in the code) takes the loop's
                # error path, traceback and all.
                log.warning("could not dispatch (all of) %d stored message(s); the sweeper will"
                            " hand them over: %r", len(new_ids), exc)
        return len(records)

    def commit_stored(self, asynchronous: bool = True,
                      partitions: list[TopicPartition] | None = None) -> None:
        """Commit the offsets of what is stored (of `partitions` only, if given)."""
        wanted = None if partitions is None else {(p.topic, p.partition) for p in partitions}
        offsets = [TopicPartition(topic, partition, offset)
                   for (topic, partition), offset in self._stored.items()
                   if wanted is None or (topic, partition) in wanted]
        if wanted is None:  # a few partitions' commit leaves the others' interval running
            self._committed_at = self._clock()
        if not offsets:
            return
        for offset in offsets:
            where = (offset.topic, offset.partition)
            del self._stored[where]
            self._highest_sent[where] = max(offset.offset, self._highest_sent.get(where, -1))
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            # Committed again with the next commit; or, when waited for (the partitions taken
            # away, or the consumer stopping: once, so said each time), never: the records are
            # read again, and the inbox drops them.
            if asynchronous:
                self._put_back(offsets)
                self._say_commit_failed(offsets, exc.args[0], offsets)
            else:
                log.warning("consumer: could not commit offsets: %s", exc)

    def note_commit_result(self, error: KafkaError | None,
                           partitions: list[TopicPartition]) -> None:
        """The broker's answer to an asynchronous offset commit: the consumer's `on_commit`,
        which the client calls from poll() (or consume, or close) on this consumer's thread, for
        asynchronous commits only. A failure is said (as an outage is: _FAILED_COMMITS_WORDS),
        and each offset that failed is put back to be committed with the next commit, unless
        superseded since: a later offset of its partition stored, or sent in any commit (one
        waited for too), or the partition revoked or lost."""
        # A partition's own error, where any has one, says which failed: librdkafka then gives
        # the request one of theirs as its error too, the partitions that went through among
        # those it answers for. (_NO_OFFSET: there was nothing to commit, which is no failure.)
        failed = [partition for partition in partitions if partition.error is not None]
        said = failed[0].error if failed else error
        if not failed and error is not None and error.code() != KafkaError._NO_OFFSET:
            failed = list(partitions)
        if not failed:
            if error is None:
                self._failed_commits.back()
            return
        put_back = [partition for partition in failed if not self._superseded(partition)]
        self._put_back(put_back)
        self._say_commit_failed(failed, said, put_back)

    def _say_commit_failed(self, failed: list[TopicPartition], error: KafkaError,
                           put_back: list[TopicPartition]) -> None:
        self._failed_commits.failed(
            f"{_positions(failed)}: {error.str()}; "
            + (f"to be committed again: {_positions(put_back)}" if put_back else
               "none to commit again (superseded, or the partition taken away since)"))

    def _superseded(self, offset: TopicPartition) -> bool:
        """Whether an offset whose commit failed has been superseded since: a later one of its
        partition stored, or sent, or the partition revoked or lost (nothing sent since)."""
        where = (offset.topic, offset.partition)
        highest_sent = self._highest_sent.get(where)
        return where in self._stored or highest_sent is None or offset.offset < highest_sent

    def _put_back(self, offsets: list[TopicPartition]) -> None:
        """Offsets whose commit failed and that nothing has superseded, to be committed with the
        next."""
        for offset in offsets:
            self._stored[(offset.topic, offset.partition)] = offset.offset

    def _note_assigned(self, consumer, partitions: list[TopicPartition]) -> None:
        # (Each starts from its committed offset: no rewind of before is due.)
        self._given_up.difference_update((p.topic, p.partition) for p in partitions)
        self._drop_rewinds_due(partitions)
        self._unreadable.assigned(partitions)

    def _commit_revoked(self, consumer, partitions: list[TopicPartition]) -> None:
        # Before another consumer of the group takes them over, so that it reads on from here.
        self.commit_stored(asynchronous=False, partitions=partitions)
        self._given_up.update((p.topic, p.partition) for p in partitions)
        self._drop_rewinds_due(partitions)
        self._drop_commits_sent(partitions)
        self._unreadable.forget(partitions)

    def _forget_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not handed over: another consumer may own them already, and a commit would fail.
        for partition in partitions:
            self._stored.pop((partition.topic, partition.partition), None)
        self._given_up.update((p.topic, p.partition) for p in partitions)
        self._drop_rewinds_due(partitions)
        self._drop_commits_sent(partitions)
        self._unreadable.forget(partitions)

    def _drop_rewinds_due(self, partitions: list[TopicPartition]) -> None:
        # (And where each was read from, and its lookup due: assigned, it starts from its
        # committed offset. Resumed, should the client keep it paused when it is assigned again.)
        paused = []
        for partition in partitions:
            where = (partition.topic, partition.partition)
            self._rewinds_due.pop(where, None)
            self._reading_from.pop(where, None)
            self._lookups_due.discard(where)
            if where in self._paused:
                self._paused.discard(where)
                paused.append(TopicPartition(*where))
        if paused:
            self._resume(paused)

    def _drop_commits_sent(self, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self._highest_sent.pop((partition.topic, partition.partition), None)

    def poll(self) -> list[ConsumedRecord]:
        # Wait for the first message only; then take whatever else is already here, so a lone
        # message is stored at once instead of waiting out the timeout for a full batch.
        try:
            first = self._consumer.poll(self._poll_timeout)
        except Exception:
            # A callback raised in it (an offset commit's answer, a rebalance), or the client
            # failed: the message it had taken, if any, is destroyed, the client's position already
            # past it. confluent-kafka 2.16 polls in chunks of 200 ms (to be woken by a signal):
            # the raise ends one chunk, the next takes a message, and only then is the raise seen
            # (a poll_timeout of 0.2 s, the default, is one chunk: nothing taken after the raise).
            # Not rewound, the record would be skipped, the next offset commit past it, never
            # stored nor swept.
            self._rewind_what_the_client_dropped("poll")
            raise
        if first is None:
            return []
        try:
            taken = self._consumer.consume(self._batch_size - 1, 0)
        except Exception:
            self._rewind_what_the_client_dropped("consume", first)
            raise
        messages = [first, *taken]
        if self._paused:  # (held by the client from before they were paused: read again later)
            messages = [m for m in messages if (m.topic(), m.partition()) not in self._paused]
        records = []
        # (Told of each record only while a batch holds a partition: not once per record else.)
        telling = self._unreadable.holding()
        try:
            for message in messages:
                error = message.error()
                if error is None:
                    records.append(to_record(message))
                    if telling:
                        telling = self._unreadable.read(records[-1])
                elif error.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    log.debug("consumer: %s", error)
                elif holds_its_partition(message):
                    self._unreadable.failed(message)
                    telling = self._unreadable.holding()
                else:
                    log.warning("consumer error: %s", error)
        except Exception:
            # The client has moved past these messages: rewind, or a later offset commit would
            # skip them for good.
            self._rewind(first_offsets([to_position(m) for m in messages if m.error() is None]))
            raise
        return records

    def _rewind_what_the_client_dropped(self, call: str, first=None) -> None:
        """The client's `call` ("poll" or "consume", after `first` was polled) raised: a callback
        it ran raised (an offset commit's answer, a rebalance), or the client failed.
        confluent-kafka then drops the messages it had taken, of any assigned partition, and the
        client reads on past them; so each partition goes back to where this consumer reads on
        from (_reading_from): `first`'s to `first`, and one not read from since it was assigned to
        its committed offset, asked of the group's coordinator. One whose committed offset cannot
        be had is paused, commits nothing, and is asked of again before a later poll
        (_look_up_again), till rewound. A rewind that fails past mending (CannotRewind), or any
        mistake here, ends the loop; the call's own error is its context, in the traceback too."""
        try:
            self._rewind_to_where_read_from(call, first)
        except CannotRewind:
            raise
        except Exception as exc:  # (a mistake in the code: some partition may be unrewound)
            raise CannotRewind(f"could not rewind after a failed {call}: {exc!r}") from exc

    def _rewind_to_where_read_from(self, call: str, first) -> None:
        where_first = None if first is None else (first.topic(), first.partition())
        try:
            assigned = [(p.topic, p.partition) for p in self._consumer.assignment()]
        except Exception as exc:  # (the client closed, say: nothing more can be read from it)
            log.warning("consumer: could not list the partitions to rewind after a failed"
                        " %s: %s", call, exc)
            assigned = [] if where_first is None else [where_first]
        positions, unknown = [], []
        for where in assigned:
            offset = self._reading_from.get(where)
            if where == where_first and first.error() is None:
                offset = first.offset()
            if offset is None:
                unknown.append(TopicPartition(*where))
            else:
                positions.append(TopicPartition(*where, offset))
        # (The known ones first: a lookup that fails leaves them rewound.)
        self._rewind(positions)
        if unknown:
            self._look_up_and_rewind(unknown)

    def _look_up_and_rewind(self, partitions: list[TopicPartition]) -> None:
        """Rewind `partitions`, read nothing of since they were assigned, to their committed
        offsets, asked of the group's coordinator. Those whose offset cannot be had are paused,
        commit nothing, and are asked again before a later poll (_look_up_again)."""
        try:
            committed = self._consumer.committed(partitions, timeout=_COMMITTED_TIMEOUT_SECONDS)
        except Exception as exc:  # (KafkaException; or the client closed, say)
            committed = []
            said = exc.args[0].str() if isinstance(exc, KafkaException) else repr(exc)
            unread = [f"{p.topic} [{p.partition}] ({said})" for p in partitions]
        else:
            unread = [f"{p.topic} [{p.partition}] ({p.error.str()})"
                      for p in committed if p.error is not None]
        found = [partition for partition in committed if partition.error is None]
        missing = ({(p.topic, p.partition) for p in partitions}
                   - {(p.topic, p.partition) for p in found})
        if missing:
            if not missing <= self._lookups_due:  # (said when it first failed)
                log.warning("consumer: could not read where to rewind %s after a failed poll or"
                            " consume: paused, nothing of theirs committed, till it is had",
                            ", ".join(unread))
            self._lookups_due |= missing
            self._given_up |= missing
            self._look_up_again_at = self._clock() + _COMMITTED_TIMEOUT_SECONDS
            if missing - self._paused:
                self._pause([TopicPartition(*where) for where in sorted(missing - self._paused)])
        for partition in found:
            where = (partition.topic, partition.partition)
            if where in self._lookups_due:
                log.info("consumer: read where to rewind %s [%d] to at last", *where)
            self._lookups_due.discard(where)
            self._given_up.discard(where)
        # (None committed: it started from its first record, the shop's consumers reading a
        # partition new to their group from the earliest, shared.kafka.)
        self._rewind([TopicPartition(p.topic, p.partition, max(p.offset, OFFSET_BEGINNING))
                      for p in found])
        self._resume_rewound()

    def _look_up_again(self) -> None:
        if self._lookups_due and self._clock() >= self._look_up_again_at:
            self._look_up_and_rewind([TopicPartition(*where)
                                      for where in sorted(self._lookups_due)])

    def _pause(self, partitions: list[TopicPartition]) -> None:
        self._paused.update((p.topic, p.partition) for p in partitions)
        try:
            self._consumer.pause(partitions)
        except Exception as exc:  # (still kept out of what poll() hands on: self._paused)
            log.warning("consumer: could not pause %s: %s",
                        ", ".join(f"{p.topic} [{p.partition}]" for p in partitions), exc)

    def _resume_rewound(self) -> None:
        """Resume the partitions paused till they were rewound that now are."""
        if not self._paused:
            return
        rewound = sorted(self._paused - self._lookups_due - set(self._rewinds_due))
        if rewound:
            self._paused.difference_update(rewound)
            self._resume([TopicPartition(*where) for where in rewound])

    def _resume(self, partitions: list[TopicPartition]) -> None:
        try:
            self._consumer.resume(partitions)
        except Exception as exc:
            log.warning("consumer: could not resume %s: %s",
                        ", ".join(f"{p.topic} [{p.partition}]" for p in partitions), exc)

    def _rewind(self, positions: list[TopicPartition]) -> None:
        """Seek each partition back to `positions`. One that cannot be is paused, and commits
        nothing, until its seek, tried again before each poll, goes through (_rewind_again, which
        resumes it), or until it is assigned again (the next rebalance, or the worker's restart),
        which starts it from its committed offset: either way the records it skipped unstored are
        read again, none past them stored before them, and never committed over before. A seek
        failing other than Kafka's way raises CannotRewind, which ends the loop."""
        for position in positions:
            self._reading_from[(position.topic, position.partition)] = position.offset
            try:
                self._seek(position)
            except KafkaException as exc:
                log.warning("consumer: could not rewind %s [%d] to %d: %s", position.topic,
                            position.partition, position.offset, exc)
                where = (position.topic, position.partition)
                self._given_up.add(where)
                self._rewinds_due[where] = min(position.offset,
                                               self._rewinds_due.get(where, position.offset))
                if where not in self._paused:  # (the client would read on past the skipped)
                    self._pause([TopicPartition(*where)])

    def _seek(self, position: TopicPartition) -> None:
        """Seek to `position`; a failure other than a KafkaException is raised as CannotRewind."""
        try:
            self._consumer.seek(position)
        except KafkaException:
            raise
        except Exception as exc:
            raise CannotRewind(f"could not rewind {position.topic} [{position.partition}] to"
                               f" {position.offset}: {exc!r}") from exc

    def _rewind_again(self) -> None:
        for (topic, partition), offset in list(self._rewinds_due.items()):
            try:
                self._seek(TopicPartition(topic, partition, offset))
            except KafkaException:
                continue  # (said when it first failed; tried again before the next poll)
            log.info("consumer: rewound %s [%d] to %d at last", topic, partition, offset)
            self._reading_from[(topic, partition)] = offset
            del self._rewinds_due[(topic, partition)]
            self._given_up.discard((topic, partition))
        self._resume_rewound()


def _positions(offsets: list[TopicPartition]) -> str:
    return ", ".join(f"{o.topic} [{o.partition}] at {o.offset}" for o in offsets)


class StoreOnOwnConnection:
    """A StoreBatch that writes each batch on a PostgreSQL connection of its own, in autocommit:
    with one INSERT, or, for a batch holding a repeat, a read and an INSERT more after it
    (insert_records, which says what a failure between them leaves to the sweeper).

    The one INSERT is atomic by itself: a transaction around it would add a BEGIN and a COMMIT
    round trip and a pooled session for every batch, and nothing else. A connection that fails is
    closed, and the next batch opens a new one.
    """

    def __init__(self, dsn: str):
        self._dsn = dsn
        self._connection = None

    def __call__(self, records: list[ConsumedRecord]) -> list[uuid.UUID]:
        if self._connection is None or self._connection.closed:
            self._connection = psycopg2.connect(self._dsn)
            self._connection.autocommit = True
        try:
            with self._connection.cursor() as cursor:
                return insert_records(cursor, records)
        except psycopg2.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
