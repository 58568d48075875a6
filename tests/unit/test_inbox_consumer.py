"""The consume pipeline's commit point, with a stand-in Kafka consumer (pure logic, no I/O)."""

import logging
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from confluent_kafka import (TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME,
                             TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, TopicPartition)

from kombu.exceptions import OperationalError as KombuOperationalError

from shared.inbox.storing import ConsumedRecord
from shared.inbox_consumer import (CannotRewind, InboxConsumer, first_offsets, next_offsets,
                                   record_timestamp, to_record)
from shared.unreadable_batches import UnreadableBatches


class FakeMessage:
    def __init__(self, topic, partition, offset):
        self._t, self._p, self._o = topic, partition, offset

    def error(self):
        return None

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return b"user"

    def value(self):
        return b"{}"

    def headers(self):
        return [("message_id", str(uuid.uuid4()).encode())]

    def timestamp(self):
        return TIMESTAMP_CREATE_TIME, 1_795_000_000_123


class FakeConsumer:
    def __init__(self, messages, calls):
        self.messages = list(messages)
        self.calls = calls

    def poll(self, timeout):
        return self.messages.pop(0) if self.messages else None

    def consume(self, n, timeout):
        taken, self.messages = self.messages[:n], self.messages[n:]
        return taken

    def commit(self, offsets, asynchronous):
        self.calls.append(("commit" if asynchronous else "commit and wait",
                           sorted((o.topic, o.partition, o.offset) for o in offsets)))

    def seek(self, position):
        self.calls.append(("seek", (position.topic, position.partition, position.offset)))

    def pause(self, partitions):
        self.calls.append(("pause", sorted(p.partition for p in partitions)))

    def resume(self, partitions):
        self.calls.append(("resume", sorted(p.partition for p in partitions)))

    def subscribe(self, topics, on_assign, on_revoke, on_lost):
        self.on_assign, self.on_revoke, self.on_lost = on_assign, on_revoke, on_lost

    def close(self):
        self.calls.append(("close",))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _records(*positions):
    return [ConsumedRecord(t, p, o, None, None, {}) for t, p, o in positions]


def test_offsets_to_commit_are_one_past_the_highest_record_of_each_partition():
    offsets = next_offsets(_records(("a", 0, 5), ("a", 0, 7), ("a", 1, 2), ("b", 0, 0)))
    assert sorted((o.topic, o.partition, o.offset) for o in offsets) == [
        ("a", 0, 8), ("a", 1, 3), ("b", 0, 1)]


def test_rewind_goes_to_the_lowest_record_of_each_partition():
    offsets = first_offsets(_records(("a", 0, 5), ("a", 0, 7), ("a", 1, 2)))
    assert sorted((o.topic, o.partition, o.offset) for o in offsets) == [("a", 0, 5), ("a", 1, 2)]


def test_offsets_are_committed_after_the_store_and_before_the_dispatch():
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 0), FakeMessage("t", 0, 1)], calls)
    new_id = uuid.uuid4()

    def store(records):
        calls.append(("store", len(records)))
        return [new_id]

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: calls.append(("dispatch", ids)),
                          commit_interval=0)
    assert inbox.run_once() == 2
    assert calls == [("store", 2), ("commit", [("t", 0, 2)]), ("dispatch", [new_id])]


def test_a_failed_store_commits_nothing_and_rewinds_to_read_the_batch_again():
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 3), FakeMessage("t", 0, 4)], calls)

    def store(records):
        raise RuntimeError("database down")

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: calls.append(("dispatch", ids)))
    with pytest.raises(RuntimeError):
        inbox.run_once()
    assert calls == [("seek", ("t", 0, 3))]


def test_nothing_is_dispatched_when_every_record_was_seen_before():
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 2, 9)], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [],
                          lambda ids: calls.append(("dispatch", ids)), commit_interval=0)
    inbox.run_once()
    assert calls == [("commit", [("t", 2, 10)])]


def _stored_as_they_come(messages, calls, clock):
    return InboxConsumer(FakeConsumer(messages, calls), ["t"], lambda records: [uuid.uuid4()],
                         lambda ids: None, batch_size=1, clock=clock)


def test_what_is_stored_is_committed_at_most_once_an_interval():
    calls, clock = [], FakeClock()
    inbox = _stored_as_they_come([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7),
                                  FakeMessage("t", 0, 5)], calls, clock)
    inbox.run_once()
    clock.now += 0.5
    inbox.run_once()
    assert calls == []
    clock.now += 0.5
    inbox.run_once()
    assert calls == [("commit", [("t", 0, 6), ("t", 1, 8)])]


def test_a_pass_that_reads_nothing_still_commits_what_waits_once_the_interval_is_over():
    calls, clock = [], FakeClock()
    inbox = _stored_as_they_come([FakeMessage("t", 0, 4)], calls, clock)
    inbox.run_once()
    inbox.run_once()
    assert calls == []
    clock.now += 1.0
    assert inbox.run_once() == 0
    assert calls == [("commit", [("t", 0, 5)])]
    clock.now += 1.0
    inbox.run_once()
    assert calls == [("commit", [("t", 0, 5)])]  # nothing new to commit


def test_partitions_taken_away_commit_first_and_lost_ones_are_forgotten():
    """A rebalance while the third record is stored: the partition handed over commits what was
    stored of it at once, the lost one commits nothing, and stopping commits the rest."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7),
                             FakeMessage("t", 2, 1)], calls)

    def store(records):
        if records[0].partition == 2:
            consumer.on_revoke(consumer, [TopicPartition("t", 0)])
            consumer.on_lost(consumer, [TopicPartition("t", 1)])
            inbox.stop()
        return []

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=1,
                          clock=FakeClock())
    inbox.run()
    assert calls == [("commit and wait", [("t", 0, 5)]), ("commit and wait", [("t", 2, 2)]),
                     ("close",)]


def _run_storing(messages, on_store) -> list:
    """Run a consumer over `messages`, a record a batch, calling `on_store(consumer, offset)` as
    each is stored; it stops after the last. Returns the consumer's calls."""
    calls = []
    consumer = FakeConsumer(messages, calls)
    last = messages[-1].offset()

    def store(records):
        on_store(consumer, records[0].offset)
        if records[0].offset == last:
            inbox.stop()
        return []

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=1,
                          clock=FakeClock())
    inbox.run()
    return calls


def test_records_in_hand_of_a_partition_taken_away_meanwhile_commit_nothing():
    """A record polled before a rebalance and stored after it: its partition's new owner may
    have committed further already, and an older offset committed over that would have records
    read again (and, once the inbox has forgotten them, handled again)."""
    def rebalance(consumer, offset):
        if offset == 4:
            consumer.on_revoke(consumer, [TopicPartition("t", 0)])

    calls = _run_storing([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], rebalance)
    assert calls == [("commit and wait", [("t", 1, 8)]), ("close",)]


def test_a_partition_that_cannot_be_rewound_commits_nothing_till_it_is_assigned_again():
    """A failed store rewinds each partition of the batch: one no longer fetched refuses the
    seek, and is paused, nothing of it stored or committed past the records it skipped, till it
    is assigned again (from its committed offset, resumed); the others are still rewound."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    consumer.consume = lambda n, timeout: [consumer.messages.pop(0)]

    def seek(position):
        if position.partition == 0:
            raise KafkaException(KafkaError(KafkaError._STATE, "partition not fetched"))
        calls.append(("seek", (position.topic, position.partition, position.offset)))

    consumer.seek = seek

    def store(records):
        raise RuntimeError("database down")

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=2,
                          commit_interval=0)
    with pytest.raises(RuntimeError):
        inbox.run_once()
    assert calls == [("pause", [0]), ("seek", ("t", 1, 7))]
    stored = []
    inbox._store_batch = lambda records: stored.extend(
        (r.partition, r.offset) for r in records) or []
    consumer.messages = [FakeMessage("t", 0, 9), FakeMessage("t", 1, 7)]
    inbox.run_once()
    assert stored == [(1, 7)]  # (0's 9, held by the client from before it was paused: dropped)
    assert calls[2:] == [("commit", [("t", 1, 8)])]  # partition 0: nothing, till it is back
    inbox._note_assigned(consumer, [TopicPartition("t", 0)])
    consumer.messages = [FakeMessage("t", 0, 4), FakeMessage("t", 0, 5)]
    inbox.run_once()
    assert stored[1:] == [(0, 4), (0, 5)]
    assert calls[3:] == [("resume", [0]), ("commit", [("t", 0, 6)])]


def test_a_rewind_that_failed_is_tried_again_before_each_poll_till_it_goes_through():
    """A partition still assigned whose seek was refused (the client not fetching it just then)
    does not wait for a rebalance to read its skipped records again: its seek is tried again
    before the next polls, and once it goes through the partition is resumed and commits again.
    Paused till then, and what the client still held of it dropped unstored, so that no record
    past the ones it skipped is stored before them."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    refusals = iter([True, True, False])  # refused as it fails, and once more after

    def seek(position):
        if position.partition == 0 and next(refusals):
            raise KafkaException(KafkaError(KafkaError._STATE, "partition not fetched yet"))
        calls.append(("seek", (position.topic, position.partition, position.offset)))

    consumer.seek = seek
    stored = []

    def store(records):
        if not stored:
            stored.append("failed once")
            raise RuntimeError("database down")
        stored.extend((r.topic, r.partition, r.offset) for r in records)
        return []

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=2,
                          commit_interval=0)
    with pytest.raises(RuntimeError):
        inbox.run_once()
    assert calls == [("pause", [0]), ("seek", ("t", 1, 7))]
    consumer.messages = [FakeMessage("t", 0, 9)]  # (held by the client from before the pause)
    inbox.run_once()  # the seek refused again: 9 is not stored, nothing committed
    assert calls[2:] == []
    consumer.messages = [FakeMessage("t", 0, 4), FakeMessage("t", 0, 5)]  # read from 4 again
    inbox.run_once()
    assert calls[2:] == [("seek", ("t", 0, 4)), ("resume", [0]), ("commit", [("t", 0, 6)])]
    assert stored[1:] == [("t", 0, 4), ("t", 0, 5)]


def test_a_partition_given_back_commits_again():
    def rebalance(consumer, offset):
        if offset == 4:
            consumer.on_revoke(consumer, [TopicPartition("t", 0)])
            consumer.on_assign(consumer, [TopicPartition("t", 0)])

    calls = _run_storing([FakeMessage("t", 0, 4), FakeMessage("t", 0, 5)], rebalance)
    assert calls == [("commit and wait", [("t", 0, 6)]), ("close",)]


def test_stopping_commits_what_is_stored_and_waits_for_the_answer():
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4)], calls)

    def store_then_stop(records):
        inbox.stop()
        return []

    inbox = InboxConsumer(consumer, ["t"], store_then_stop, lambda ids: None, clock=FakeClock())
    inbox.run()
    assert calls == [("commit and wait", [("t", 0, 5)]), ("close",)]


# A commit's answer as the client's on_commit gives it: the broker refused the request.
TIMED_OUT = KafkaError(KafkaError.REQUEST_TIMED_OUT)


def _offsets(*positions):
    return [TopicPartition(t, p, o) for t, p, o in positions]


def _commit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "could not commit" in r.getMessage()]


def test_an_offset_whose_commit_failed_is_said_and_committed_again_with_the_next(caplog):
    """The answer to an asynchronous commit comes later, through on_commit: a failure is said in
    a line, and its offsets, dropped from what waits to be committed as the commit was sent, are
    committed again, until one goes through."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0)
    inbox.run_once()
    inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, 5), ("t", 1, 8)))
    (warning,) = _commit_warnings(caplog)
    assert warning == ("the inbox consumer could not commit t [0] at 5, t [1] at 8: Broker:"
                       " Request timed out; to be committed again: t [0] at 5, t [1] at 8")
    inbox.run_once()
    assert calls == [("commit", [("t", 0, 5), ("t", 1, 8)])] * 2
    inbox.note_commit_result(None, _offsets(("t", 0, 5), ("t", 1, 8)))
    inbox.run_once()
    assert len(calls) == 2 and len(_commit_warnings(caplog)) == 1


def test_a_failed_commit_superseded_since_by_a_later_offset_is_not_committed_again(caplog):
    """Partition 0's failed offset has a later one sent since, partition 1's a later one stored
    since: either goes in its place, and the older is not put back (it would be committed over
    the later one)."""
    calls, clock = [], FakeClock()
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    clock.now += 1
    inbox.run_once()  # sends 5 and 8
    consumer.messages = [FakeMessage("t", 0, 5)]
    clock.now += 1
    inbox.run_once()  # sends 6
    consumer.messages = [FakeMessage("t", 1, 8)]
    inbox.run_once()  # stores 9, its interval not over
    inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, 5), ("t", 1, 8)))
    assert _commit_warnings(caplog)[0].endswith(
        "none to commit again (superseded, or the partition taken away since)")
    clock.now += 1
    inbox.run_once()
    assert calls == [("commit", [("t", 0, 5), ("t", 1, 8)]), ("commit", [("t", 0, 6)]),
                     ("commit", [("t", 1, 9)])]
    inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, 6)))  # the later one fails too
    clock.now += 1
    inbox.run_once()
    assert calls[-1] == ("commit", [("t", 0, 6)])


@pytest.mark.parametrize("taken_away", ["revoked and given back", "lost"])
def test_a_failed_commit_of_a_partition_taken_away_since_is_not_committed_again(caplog,
                                                                              taken_away):
    """Revoked or lost after the commit was sent, the partition may have had another owner, who
    committed further: the older offset committed again would have records read again."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 9)], calls)

    def store(records):
        if records[0].partition == 1:
            inbox.stop()
            if taken_away == "lost":
                consumer.on_lost(consumer, [TopicPartition("t", 0)])
            else:
                consumer.on_revoke(consumer, [TopicPartition("t", 0)])
                consumer.on_assign(consumer, [TopicPartition("t", 0)])
            inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, 5)))
        return []

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=1,
                          commit_interval=0)
    inbox.run()
    assert calls == [("commit", [("t", 0, 5)]), ("commit", [("t", 1, 10)]), ("close",)]
    assert len(_commit_warnings(caplog)) == 1


def test_a_failed_commit_answered_as_the_consumer_closes_is_not_committed_over_the_last():
    """confluent-kafka's close() serves the answers still queued, then revokes the partitions:
    the answer to an asynchronous commit (5) that failed comes after the commit waited for as the
    consumer stopped (6). Put back, the older offset would be committed as the partition is
    revoked, over the later one, moving the group's position back."""
    calls, clock = [], FakeClock()
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 0, 5)], calls)

    def store(records):
        if records[0].offset == 5:
            inbox.stop()
        return []

    def close():
        inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, 5)))
        consumer.on_revoke(consumer, [TopicPartition("t", 0)])
        calls.append(("close",))

    consumer.close = close
    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, batch_size=1, clock=clock)
    clock.now += 1  # 4 stored, its interval over: 5 sent; 5 stored, within the next: 6 waits
    inbox.run()
    assert calls == [("commit", [("t", 0, 5)]), ("commit and wait", [("t", 0, 6)]), ("close",)]


def test_only_the_partitions_whose_commit_failed_are_committed_again(caplog):
    """A request that went through with an error for some of its partitions: librdkafka
    (rd_kafka_handle_OffsetCommit) gives each that failed its `error`, and the request one of
    theirs too, though partition 0 went through; and no offset to commit (_NO_OFFSET) is no
    failure."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0)
    inbox.run_once()
    inbox.note_commit_result(KafkaError(KafkaError._NO_OFFSET), [])
    assert _commit_warnings(caplog) == []
    refused = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
    inbox.note_commit_result(refused, [TopicPartition("t", 0, 5),
                                       SimpleNamespace(topic="t", partition=1, offset=8,
                                                       error=refused)])
    assert _commit_warnings(caplog) == [
        "the inbox consumer could not commit t [1] at 8: Broker: Unknown topic or partition; to"
        " be committed again: t [1] at 8"]
    inbox.run_once()
    assert calls[-1] == ("commit", [("t", 1, 8)])


def test_commits_failing_while_the_coordinator_is_away_are_said_once_then_once_a_minute(caplog):
    """A commit a second, each failing while the group's coordinator is away: said as the failures
    begin, then once a minute while they last (as a lost database connection is:
    shared.outage_log), not in a line each; and at INFO once a commit goes through again."""
    caplog.set_level(logging.INFO)
    calls, clock = [], FakeClock()
    consumer = FakeConsumer([], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0, clock=clock)
    for offset in range(5, 70):
        consumer.messages = [FakeMessage("t", 0, offset - 1)]
        inbox.run_once()
        inbox.note_commit_result(TIMED_OUT, _offsets(("t", 0, offset)))
        clock.now += 1
    inbox.run_once()
    inbox.note_commit_result(None, _offsets(("t", 0, 69)))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "the inbox consumer could not commit t [0] at 5: Broker: Request timed"
                          " out; to be committed again: t [0] at 5"),
        (logging.WARNING, "the inbox consumer: offset commits still failing after 60 s, 61 failed"
                          " (the last could not commit t [0] at 65: Broker: Request timed out; to"
                          " be committed again: t [0] at 65)"),
        (logging.INFO, "the inbox consumer: offset commits go through again after 65 s, 65"
                       " failed")]
    assert calls[-1] == ("commit", [("t", 0, 69)])


class FakeError(FakeMessage):
    """What the client returns for an error: where it sits, if anywhere (partition None: the
    client's own, a broker gone, say)."""

    def __init__(self, topic, partition, offset, error):
        super().__init__(topic, partition, offset)
        self._error = error

    def error(self):
        return self._error


_WAITS = ("; the partition waits there, its records never skipped (README, Deploying: a record"
          " batch the workers cannot read)")


def _said(offset):
    """What librdkafka says of a gzip batch at `offset` that is no gzip."""
    return (f"Decompression (codec 0x1) of message at {offset} of 30 bytes failed: Local: Invalid"
            " compressed data")


def _unreadable_at(partition, offset):
    return FakeError("t", partition, offset,
                     KafkaError(KafkaError._BAD_COMPRESSION, _said(offset)))


def _lines(caplog):
    """The consumer's lines (another test's thread still running, a cache's, may log meanwhile)."""
    return [(record.levelno, record.getMessage()) for record in caplog.records
            if record.name == "shared.inbox_consumer"]


def test_a_record_batch_the_client_cannot_read_is_said_once_then_once_a_minute(caplog):
    """The client fetches a record batch it cannot read again and again, an error a second or so,
    never passing over it: said as the errors begin, then once a minute while they last, and at
    INFO once a record of its partition at or past the batch comes; not in a line each. The
    client's other errors (of no record) are said each as before."""
    caplog.set_level(logging.INFO)
    calls, clock = [], FakeClock()
    consumer = FakeConsumer([], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    for _ in range(65):
        consumer.messages = [_unreadable_at(0, 7), FakeMessage("t", 1, 3)]
        inbox.run_once()
        clock.now += 1
    consumer.messages = [FakeError(None, None, None, KafkaError(KafkaError._TRANSPORT)),
                         FakeMessage("t", 0, 10)]
    inbox.run_once()
    assert _lines(caplog) == [
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}"),
        (logging.WARNING, "the inbox consumer: records still unreadable after 60 s, 61 tries (the"
                          f" last: t [0] at 7: {_said(7)}){_WAITS}"),
        (logging.WARNING, "consumer error: KafkaError{code=_TRANSPORT,val=-195,str=\"Local:"
                          " Broker transport failure\"}"),
        (logging.INFO, "the inbox consumer: records of t [0] are read again from offset 10, after"
                       " 65 s, 65 unreadable tries")]


def test_each_partition_a_record_batch_holds_is_said_of_on_its_own(caplog):
    """A second partition held by a batch the client cannot read, while the first still is, is
    said as the first was: its own first line, reminders and end (one log for all said nothing of
    the second, and its reminders named the last error's partition only)."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    for second in range(75):
        consumer.messages = [_unreadable_at(0, 7)]
        if second >= 10:
            consumer.messages.append(_unreadable_at(1, 4))
        inbox.run_once()
        clock.now += 1
    consumer.messages = [FakeMessage("t", 0, 10), _unreadable_at(1, 4)]
    inbox.run_once()
    assert _lines(caplog) == [
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}"),
        (logging.WARNING, f"the inbox consumer cannot read t [1] at 4: {_said(4)}{_WAITS}"),
        (logging.WARNING, "the inbox consumer: records still unreadable after 60 s, 61 tries (the"
                          f" last: t [0] at 7: {_said(7)}){_WAITS}"),
        (logging.WARNING, "the inbox consumer: records still unreadable after 60 s, 61 tries (the"
                          f" last: t [1] at 4: {_said(4)}){_WAITS}"),
        (logging.INFO, "the inbox consumer: records of t [0] are read again from offset 10, after"
                       " 75 s, 75 unreadable tries")]


def test_records_are_told_to_what_says_of_unreadable_batches_only_while_one_holds_a_partition(
        monkeypatch, caplog):
    """Not each record of every batch (the hot path): only those read while a batch the client
    cannot read holds a partition, till none does; what is said stays as it was."""
    caplog.set_level(logging.INFO)
    told = []
    read = UnreadableBatches.read

    def telling(batches, record):
        told.append((record.partition, record.offset))
        return read(batches, record)

    monkeypatch.setattr(UnreadableBatches, "read", telling)
    consumer = FakeConsumer([FakeMessage("t", 0, 0), FakeMessage("t", 1, 0)], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          clock=FakeClock())
    inbox.run_once()
    assert told == []
    consumer.messages = [FakeMessage("t", 1, 1), _unreadable_at(0, 7), FakeMessage("t", 1, 2),
                         FakeMessage("t", 0, 7), FakeMessage("t", 1, 3)]
    inbox.run_once()
    assert told == [(1, 2), (0, 7)]  # (its hold over at 7)
    consumer.messages = [FakeMessage("t", 0, 8)]
    inbox.run_once()
    assert told == [(1, 2), (0, 7)]
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING, logging.INFO]


def test_a_record_below_the_batch_read_again_does_not_end_what_its_partition_waits_on(caplog):
    """A failed insert rewinds the partition, and its records before the batch are read again:
    that is no record past the batch, and says neither that the partition reads on nor, at the
    next fetch of the batch, that it waits again (it said both, each second)."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    for _ in range(5):
        consumer.messages = [FakeMessage("t", 0, 0), _unreadable_at(0, 1)]
        inbox.run_once()
        clock.now += 1
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING]
    consumer.messages = [FakeMessage("t", 0, 1)]  # the batch read, its cause mended
    inbox.run_once()
    assert _lines(caplog)[1:] == [
        (logging.INFO, "the inbox consumer: records of t [0] are read again from offset 1, after"
                       " 5 s, 5 unreadable tries")]


@pytest.mark.parametrize("taken_away", ["on_revoke", "on_lost"])
def test_a_partition_taken_away_while_a_batch_holds_it_is_forgotten(caplog, taken_away):
    """A partition revoked or lost while a batch it cannot read holds it is forgotten: its new
    owner says so; given back, a record of it says nothing of before, and the batch fetched again
    is said again from its first line."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    inbox.stop()
    inbox.run()  # (which subscribes, setting the rebalance callbacks, and returns: stopped)
    consumer.messages = [_unreadable_at(0, 7)]
    inbox.run_once()
    getattr(consumer, taken_away)(consumer, [TopicPartition("t", 0)])
    consumer.on_assign(consumer, [TopicPartition("t", 0)])
    clock.now += 10
    consumer.messages = [_unreadable_at(0, 7)]
    inbox.run_once()
    getattr(consumer, taken_away)(consumer, [TopicPartition("t", 0)])
    consumer.on_assign(consumer, [TopicPartition("t", 0)])
    consumer.messages = [FakeMessage("t", 0, 9)]
    inbox.run_once()
    assert _lines(caplog) == [
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}"),
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}")]


def test_a_partition_held_again_further_on_ends_the_first_outage_and_says_the_second(caplog):
    """The partition read past its batch (its cause mended, or the group's offset moved past it)
    with no record of it read before the next batch it cannot read, further on: the first outage
    is over, and the second is said from its first line, naming its own offset (it was said as a
    reminder of the first, the first's offset kept)."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None, clock=clock)
    for offset in (7,) * 5 + (12,) * 60:
        consumer.messages = [_unreadable_at(0, offset)]
        inbox.run_once()
        clock.now += 1
    consumer.messages = [FakeMessage("t", 0, 10)]  # below the second batch: no sign
    inbox.run_once()
    assert _lines(caplog) == [
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}"),
        (logging.INFO, "the inbox consumer: records of t [0] are read past offset 7, up to another"
                       " batch it cannot read, at 12, after 5 s, 5 unreadable tries"),
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 12: {_said(12)}{_WAITS}")]


def test_an_error_of_a_batch_at_no_offset_is_said_as_any_other_error(caplog):
    """An error the client gives without an offset (offset() None) holds no partition at a place:
    said in a WARNING line each, never raising."""
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          clock=FakeClock())
    error = KafkaError(KafkaError._BAD_COMPRESSION, _said(7))
    for _ in range(2):
        consumer.messages = [FakeError("t", 0, None, error)]
        assert inbox.run_once() == 0
    assert _lines(caplog) == [(logging.WARNING, f"consumer error: {error}")] * 2


@pytest.mark.parametrize("taken_away", ["on_revoke", "on_lost"])
def test_an_error_in_hand_of_a_partition_taken_away_as_the_batch_is_polled_says_nothing(
        caplog, taken_away):
    """The partition is revoked (or lost) inside consume(), after poll() returned the error of its
    batch: the error, handled after, names a partition no longer this consumer's and says
    nothing, and given back, the batch fetched again is said from its first line (the error
    re-created what was forgotten, and the partition's outage ran on unsaid)."""
    caplog.set_level(logging.INFO)
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          clock=FakeClock())
    inbox.stop()
    inbox.run()  # (which subscribes, setting the rebalance callbacks, and returns: stopped)

    def consume_taking_it_away(n, timeout):
        getattr(consumer, taken_away)(consumer, [TopicPartition("t", 0)])
        return []

    consumer.consume = consume_taking_it_away
    consumer.messages = [_unreadable_at(0, 7)]
    inbox.run_once()
    assert _lines(caplog) == []
    consumer.on_assign(consumer, [TopicPartition("t", 0)])
    consumer.consume = lambda n, timeout: []
    consumer.messages = [_unreadable_at(0, 7)]
    inbox.run_once()
    assert _lines(caplog) == [
        (logging.WARNING, f"the inbox consumer cannot read t [0] at 7: {_said(7)}{_WAITS}")]


@pytest.mark.parametrize("code, text, holds", [
    (KafkaError._BAD_COMPRESSION, _said(5), True),
    (KafkaError._NOT_IMPLEMENTED, "Decompression (codec 0x5) of message at 5 of 30 bytes failed:"
                                  " Local: Not implemented", True),
    # (LZ4 with bytes after its frame, and an allocation failure: other codes of the same failure)
    (KafkaError._BAD_MSG, "Decompression (codec 0x3) of message at 5 of 100 bytes failed:"
                          " Local: Bad message format", True),
    (KafkaError._CRIT_SYS_RESOURCE, "Decompression (codec 0x1) of message at 5 of 30 bytes failed:"
                                    " Local: Critical system resource failure", True),
    (KafkaError.INVALID_MSG, "Fetch from broker 1 failed at offset 5 (leader epoch 0): Broker:"
                             " Invalid message", True),
    # (a batch of a format version librdkafka does not know, which it passes over)
    (KafkaError._NOT_IMPLEMENTED, "Unsupported Message(Set) MagicByte 3 at offset 5", False),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, "Fetch from broker 1 failed: Broker: Topic"
                                            " authorization failed", False),
    (KafkaError._BAD_MSG, "MessageSet at offset 5 (30 bytes) failed CRC32C check", False)])
def test_only_errors_of_a_batch_the_client_cannot_read_say_its_partition_waits(
        caplog, code, text, holds):
    """Only an error of a record batch the client cannot read, and fetches again and again, says
    that its partition waits there, once; any other error of a partition is said each time, as
    before (not an outage that a record of the partition would end)."""
    caplog.set_level(logging.INFO)
    consumer = FakeConsumer([], [])
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          clock=FakeClock())
    error = KafkaError(code, text)
    for _ in range(3):
        consumer.messages = [FakeError("t", 0, 5, error)]
        inbox.run_once()
    if holds:
        assert _lines(caplog) == [
            (logging.WARNING, f"the inbox consumer cannot read t [0] at 5: {text}{_WAITS}")]
    else:
        assert _lines(caplog) == [(logging.WARNING, f"consumer error: {error}")] * 3


def test_an_offset_commit_refused_as_it_is_sent_is_committed_again_with_the_next():
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4)], calls)
    refusals = iter([True])

    def commit(offsets, asynchronous):
        if next(refusals, False):
            raise KafkaException(KafkaError(KafkaError._STATE, "not in the group yet"))
        calls.append(("commit", sorted((o.topic, o.partition, o.offset) for o in offsets)))

    consumer.commit = commit
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0)
    inbox.run_once()
    assert calls == []
    inbox.run_once()
    assert calls == [("commit", [("t", 0, 5)])]


def test_topic_partition_is_what_confluent_kafka_expects():
    assert isinstance(next_offsets(_records(("a", 0, 1)))[0], TopicPartition)


class StampedMessage(FakeMessage):
    def __init__(self, kind, milliseconds):
        super().__init__("t", 0, 0)
        self._stamp = (kind, milliseconds)

    def timestamp(self):
        return self._stamp


@pytest.mark.parametrize("kind", [TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME])
def test_a_records_timestamp_becomes_an_aware_datetime_to_the_millisecond(kind):
    stamped = StampedMessage(kind, 1_795_000_000_123)
    expected = datetime(2026, 11, 18, 11, 6, 40, 123000, tzinfo=timezone.utc)
    assert record_timestamp(stamped) == expected
    assert to_record(stamped).timestamp == expected


def test_a_record_without_a_timestamp_has_none():
    assert record_timestamp(StampedMessage(TIMESTAMP_NOT_AVAILABLE, -1)) is None


def test_a_timestamp_past_what_a_datetime_holds_is_none_not_an_error():
    for milliseconds in (253_402_300_800_000, 2**62):  # 10000-01-01, and far beyond
        stamped = StampedMessage(TIMESTAMP_CREATE_TIME, milliseconds)
        assert record_timestamp(stamped) is None
        assert to_record(stamped).timestamp is None


class UnreadableHeadersMessage(FakeMessage):
    def headers(self):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_headers_that_cannot_be_read_leave_a_record_without_headers():
    record = to_record(UnreadableHeadersMessage("t", 0, 7))
    assert (record.offset, record.headers, record.value) == (7, {}, b"{}")


class UnreadableMessage(FakeMessage):
    def key(self):
        raise RuntimeError("a record this code cannot read")


def test_a_batch_that_cannot_be_read_whole_is_read_again_not_skipped():
    """Were the batch dropped, the next stored record's offset commit would skip it for good."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 5), UnreadableMessage("t", 0, 6),
                             FakeMessage("t", 1, 9)], calls)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0)
    with pytest.raises(RuntimeError):
        inbox.run_once()
    assert sorted(calls) == [("seek", ("t", 0, 5)), ("seek", ("t", 1, 9))]


def test_a_dispatch_that_fails_leaves_the_stored_records_to_the_sweeper_and_goes_on(caplog):
    """Redis down: the records are stored and their offsets committed, the failure is a warning
    (the sweeper hands them over later), and nothing is raised to pause the consumer's loop."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 0), FakeMessage("t", 0, 1)], calls)

    def no_queue(ids):
        calls.append(("dispatch", len(ids)))
        raise KombuOperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    inbox = InboxConsumer(consumer, ["t"], lambda records: [uuid.uuid4() for _ in records],
                          no_queue, commit_interval=0)
    assert inbox.run_once() == 2
    assert calls == [("commit", [("t", 0, 2)]), ("dispatch", 2)]
    assert "the sweeper will hand them over" in caplog.text


def test_a_dispatch_that_fails_for_a_mistake_in_the_code_is_raised_as_before():
    """Only the task queue being away is the sweeper's to make good quietly: a TypeError (a task
    called with the wrong arguments, say) reaches the loop's error path with its traceback."""
    consumer = FakeConsumer([FakeMessage("t", 0, 0)], [])

    def mistaken(ids):
        raise TypeError("handle_inbox_batch() takes 2 positional arguments but 3 were given")

    inbox = InboxConsumer(consumer, ["t"], lambda records: [uuid.uuid4() for _ in records],
                          mistaken, commit_interval=0)
    with pytest.raises(TypeError):
        inbox.run_once()


class CallbackRaisingConsumer(FakeConsumer):
    """A consumer whose `raising_in` call ("poll" or "consume") takes what it is given, then
    raises while `raising`, as confluent-kafka's does when a callback raises in it (the messages
    dropped); it has `assigned` partitions, and a group whose committed offsets are `committed`
    (or which cannot be asked: None, or the error `committed()` raises)."""

    def __init__(self, messages, calls, assigned, committed, raising_in="consume"):
        super().__init__(messages, calls)
        self.assigned, self.committed_offsets, self.raising = assigned, committed, False
        self.raising_in, self.raised = raising_in, 0

    def poll(self, timeout):
        return self._raising_now("poll", super().poll(timeout))

    def consume(self, n, timeout):
        return self._raising_now("consume", super().consume(n, timeout))

    def _raising_now(self, call, taken):
        if self.raising and call == self.raising_in:
            self.raised += 1
            raise RuntimeError("a callback raised")
        return taken

    def assignment(self):
        return [TopicPartition("t", p) for p in self.assigned]

    def committed(self, partitions, timeout):
        self.calls.append(("committed", sorted(p.partition for p in partitions)))
        if self.committed_offsets is None:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "coordinator away"))
        if isinstance(self.committed_offsets, Exception):
            raise self.committed_offsets
        return [TopicPartition(p.topic, p.partition, self.committed_offsets[p.partition])
                for p in partitions]


def _read_on_then_failing(committed, clock=None, call="consume") -> tuple[
        InboxConsumer, CallbackRaisingConsumer]:
    """An inbox read on past 4 of partition 0 and 7 of 1, of 4 partitions, whose next `call`
    raises, dropping 8 of partition 1 (polled), 5 of 0 and 3 of 2 (2 read for the first time)."""
    calls = []
    consumer = CallbackRaisingConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls,
                                       assigned=[0, 1, 2, 3], committed=committed,
                                       raising_in=call)
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0, clock=clock or FakeClock())
    inbox.run_once()  # (read on past 4 and 7)
    calls.clear()
    consumer.raising = True
    consumer.messages = [FakeMessage("t", 1, 8), FakeMessage("t", 0, 5), FakeMessage("t", 2, 3)]
    with pytest.raises(RuntimeError, match="a callback raised"):
        inbox.run_once()
    return inbox, consumer


@pytest.mark.parametrize("call", ["poll", "consume"])
def test_a_poll_or_consume_that_raises_rewinds_every_partition_to_where_it_was_read_from(call):
    """The message polled (or polled before it), and those it took and dropped, of any
    partition, are read again: each partition rewound to one past the last record handed on, or,
    none read since it was assigned, to its committed offset (one with none committed to its
    first record)."""
    _, consumer = _read_on_then_failing(committed={2: 3, 3: -1001}, call=call)
    assert sorted(consumer.calls[:2]) == [("seek", ("t", 0, 5)), ("seek", ("t", 1, 8))]
    assert consumer.calls[2] == ("committed", [2, 3])
    assert sorted(consumer.calls[3:]) == [("seek", ("t", 2, 3)), ("seek", ("t", 3, -2))]


def test_a_partition_whose_committed_offset_cannot_be_had_is_paused_till_it_is_and_rewound(
        caplog):
    """Asked again before a later poll (at most every 5 s: each ask holds the others up), not
    left till the partition is assigned again (days, in a steady group); paused meanwhile, and
    what the client held of it dropped unstored, so that nothing past the records dropped is
    stored, or committed, before them. (The lookup's failure is the coordinator's, which the
    broker the integration tests run cannot be made to give on cue: a stand-in client here.)"""
    stored = []
    clock = FakeClock()
    inbox, consumer = _read_on_then_failing(committed=None, clock=clock)
    inbox._store_batch = lambda records: stored.extend(
        (r.partition, r.offset) for r in records) or []
    assert sorted(consumer.calls[:2]) == [("seek", ("t", 0, 5)), ("seek", ("t", 1, 8))]
    assert consumer.calls[2:] == [("committed", [2, 3]), ("pause", [2, 3])]
    assert ("could not read where to rewind t [2] (coordinator away), t [3] (coordinator away)"
            " after a failed poll or consume: paused, nothing of theirs committed, till it is had"
            ) in caplog.text
    consumer.calls.clear()
    consumer.raising = False
    # (Records of 2 the client held from before it was paused; 1's read again.)
    consumer.messages = [FakeMessage("t", 2, 9), FakeMessage("t", 1, 8)]
    inbox.run_once()
    assert stored == [(1, 8)]
    assert consumer.calls == [("commit", [("t", 1, 9)])]
    consumer.calls.clear()
    clock.now += 5  # (asked again, and still not had: said once)
    inbox.run_once()
    assert consumer.calls == [("committed", [2, 3])]
    assert caplog.text.count("could not read where to rewind") == 1
    consumer.calls.clear()
    consumer.committed_offsets = {2: 3, 3: 0}
    clock.now += 4  # (not asked again yet)
    inbox.run_once()
    assert consumer.calls == []
    clock.now += 1
    consumer.messages = [FakeMessage("t", 2, 3), FakeMessage("t", 3, 0)]
    inbox.run_once()
    assert consumer.calls[0] == ("committed", [2, 3])
    assert sorted(consumer.calls[1:3]) == [("seek", ("t", 2, 3)), ("seek", ("t", 3, 0))]
    assert consumer.calls[3:] == [("resume", [2, 3]), ("commit", [("t", 2, 4), ("t", 3, 1)])]
    assert stored == [(1, 8), (2, 3), (3, 0)]


@pytest.mark.parametrize("taken_away", ["_commit_revoked", "_forget_lost"])
def test_a_partition_paused_for_its_lookup_is_resumed_and_forgotten_as_it_is_taken_away(
        taken_away):
    """Assigned again, it starts from its committed offset: no lookup is due, and it is not
    left paused."""
    clock = FakeClock()
    inbox, consumer = _read_on_then_failing(committed=None, clock=clock)
    consumer.calls.clear()
    consumer.raising = False
    getattr(inbox, taken_away)(consumer, [TopicPartition("t", 2), TopicPartition("t", 3)])
    assert consumer.calls == [("resume", [2, 3])]
    inbox._note_assigned(consumer, [TopicPartition("t", 2), TopicPartition("t", 3)])
    consumer.calls.clear()
    clock.now += 5
    consumer.messages = [FakeMessage("t", 2, 0)]
    inbox.run_once()
    assert consumer.calls == [("commit", [("t", 2, 1)])]


def test_a_lookup_failing_other_than_kafka_s_way_rewinds_what_it_can_and_raises_consume_s_error():
    """The client closed under it, say: the partitions whose positions are known are rewound
    all the same (the polled message's with them), and consume()'s own error is the one raised,
    not buried under the lookup's (the partition left to it is paused, and asked of again)."""
    calls = []
    consumer = CallbackRaisingConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls,
                                       assigned=[0, 1, 2], committed=RuntimeError("closed"))
    inbox = InboxConsumer(consumer, ["t"], lambda records: [], lambda ids: None,
                          commit_interval=0, clock=FakeClock())
    inbox.run_once()
    calls.clear()
    consumer.raising = True
    consumer.messages = [FakeMessage("t", 1, 8), FakeMessage("t", 0, 5), FakeMessage("t", 2, 3)]
    with pytest.raises(RuntimeError, match="a callback raised"):
        inbox.run_once()
    assert sorted(c for c in calls if c[0] == "seek") == [("seek", ("t", 0, 5)),
                                                          ("seek", ("t", 1, 8))]
    assert calls[-1] == ("pause", [2])


def _seek_failing_for(consumer, partition, error):
    """Make `consumer`'s seek of `partition` raise `error` (noted as a call); stopping `inbox`
    at the first poll after it, which a consumer carrying on past it would make."""
    def seek(position):
        if position.partition == partition:
            consumer.calls.append(("seek failed", position.partition))
            raise error
        consumer.calls.append(("seek", (position.topic, position.partition, position.offset)))

    consumer.seek = seek


class _PollNotedAfterAFailedSeek:
    """A CallbackRaisingConsumer's poll, noted once a seek (or the call named `failed`) has
    failed, or once its read has raised, and stopping the inbox then: a consumer that carries on
    past a partition it could not rewind, or that did not rewind what the read dropped, polls
    again."""

    def __init__(self, consumer, failed="seek failed"):
        self._poll, self._consumer, self.inbox, self._failed = consumer.poll, consumer, None, failed

    def __call__(self, timeout):
        if (self._consumer.raised
                or any(call[0] == self._failed for call in self._consumer.calls)):
            self._consumer.calls.append(("poll",))
            self.inbox.stop()
        return self._poll(timeout)


def _inbox_whose_second_read_raises(consumer, polls) -> InboxConsumer:
    """An inbox over `consumer`, stopped by `polls`, whose first batch stored has the next
    poll() or consume() (its `raising_in`) raise, dropping records of partitions 0, 1 and 2 (2
    read for the first time)."""
    def store(records):
        if not consumer.raising:
            consumer.raising = True
            consumer.messages = [FakeMessage("t", 1, 8), FakeMessage("t", 0, 5),
                                 FakeMessage("t", 2, 3)]
        return []

    inbox = polls.inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None,
                                        commit_interval=3600, clock=FakeClock())
    return inbox


@pytest.mark.parametrize("call", ["poll", "consume"])
@pytest.mark.parametrize("error", [RuntimeError("Consumer closed"), TypeError("an offset?"),
                                   ValueError("an offset?")], ids=["closed", "type", "value"])
def test_a_seek_failing_other_than_kafka_s_way_after_a_failed_read_ends_the_loop(error, call,
                                                                                 caplog):
    """A partition whose committed offset was had but whose seek then failed (the client closed,
    or a mistake in the code: no retry mends either) was left neither rewound nor paused, and read
    on past the records poll() or consume() dropped. The loop ends instead, polling nothing more;
    it commits what is stored if it still can, all below them, and closes (the worker then stops,
    to be started again, and the group reads the partition on from its committed offset). The
    partitions whose positions are known were rewound first. A closed client's commit fails as
    its seek did (confluent-kafka's RuntimeError): said, and CannotRewind raised all the same."""
    calls = []
    consumer = CallbackRaisingConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls,
                                       assigned=[0, 1, 2], committed={2: 0}, raising_in=call)
    _seek_failing_for(consumer, 2, error)
    consumer.poll = polls = _PollNotedAfterAFailedSeek(consumer)
    closed = isinstance(error, RuntimeError)
    if closed:
        commit = consumer.commit

        def commit_closed(offsets, asynchronous):
            commit(offsets, asynchronous)  # (noted, then failing)
            raise RuntimeError("Consumer closed")

        consumer.commit = commit_closed

    inbox = _inbox_whose_second_read_raises(consumer, polls)
    with pytest.raises(CannotRewind, match=r"t \[2\] to 0") as raised:
        inbox.run()
    assert raised.value.__cause__ is error
    assert "a callback raised" in str(error.__context__)  # (the call's own, not buried)
    assert calls == [("seek", ("t", 0, 5)), ("seek", ("t", 1, 8)), ("committed", [2]),
                     ("seek failed", 2), ("commit and wait", [("t", 0, 5), ("t", 1, 8)]),
                     ("close",)]
    assert ("could not commit what is stored as it stops" in caplog.text) is closed


@pytest.mark.parametrize("call", ["poll", "consume"])
def test_a_mistake_in_the_rewind_after_a_failed_read_ends_the_loop(call):
    """Any error in rewinding what a failed poll() or consume() dropped but a seek's (a mistake in
    the code: here the group's committed offsets come back as objects without an error) may leave
    a partition unrewound, the client reading on past the records dropped: the loop ends as for a
    seek that fails past mending, nothing polled after it, the call's own error kept in the
    traceback. The partitions whose positions are known were rewound first."""
    calls = []
    consumer = CallbackRaisingConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls,
                                       assigned=[0, 1, 2], committed={}, raising_in=call)

    def committed(partitions, timeout):
        calls.append(("committed oddly", sorted(p.partition for p in partitions)))
        return [SimpleNamespace(topic=p.topic, partition=p.partition, offset=0)
                for p in partitions]

    consumer.committed = committed
    consumer.poll = polls = _PollNotedAfterAFailedSeek(consumer, failed="committed oddly")

    inbox = _inbox_whose_second_read_raises(consumer, polls)
    with pytest.raises(CannotRewind, match=f"could not rewind after a failed {call}") as raised:
        inbox.run()
    mistake = raised.value.__cause__
    assert isinstance(mistake, AttributeError)
    assert "a callback raised" in str(mistake.__context__)  # (the call's own, not buried)
    assert calls == [("seek", ("t", 0, 5)), ("seek", ("t", 1, 8)), ("committed oddly", [2]),
                     ("commit and wait", [("t", 0, 5), ("t", 1, 8)]), ("close",)]


def test_a_seek_failing_other_than_kafka_s_way_after_a_failed_store_or_sought_again_ends_the_loop():
    """As after a failed consume(): after a failed store, and as a seek Kafka refused is tried
    again before a poll, the loop ends, nothing polled after it, nor committed past it."""
    calls = []
    consumer = FakeConsumer([FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)], calls)
    _seek_failing_for(consumer, 0, RuntimeError("Consumer closed"))

    def store(records):
        raise ConnectionError("database down")

    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, commit_interval=0)
    with pytest.raises(CannotRewind, match=r"t \[0\] to 4"):
        inbox.run_once()
    assert calls == [("seek failed", 0)]

    calls.clear()
    refused = KafkaException(KafkaError(KafkaError._STATE, "partition not fetched"))
    consumer.messages = [FakeMessage("t", 0, 4), FakeMessage("t", 1, 7)]
    _seek_failing_for(consumer, 0, refused)
    inbox = InboxConsumer(consumer, ["t"], store, lambda ids: None, commit_interval=0)
    with pytest.raises(ConnectionError):
        inbox.run_once()
    assert calls == [("seek failed", 0), ("pause", [0]), ("seek", ("t", 1, 7))]  # (see below)
    _seek_failing_for(consumer, 0, TypeError("an offset?"))
    consumer.messages = [FakeMessage("t", 0, 9)]
    with pytest.raises(CannotRewind, match=r"t \[0\] to 4"):
        inbox.run_once()
    assert calls[3:] == [("seek failed", 0)]
    assert len(consumer.messages) == 1  # (not polled)
