"""Inbox consumers of one group on the Kafka-protocol broker, through the rebalances that members
joining and leaving make: what the group commits never runs past what the inbox holds."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import psycopg2
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import driver_dsn
from shared.inbox.storing import ConsumedRecord
from shared.inbox_consumer import InboxConsumer, StoreOnOwnConnection
from shared.kafka import build_consumer, consumer_config
from tests.inbox_topics import cleared_away, new_topic_of_its_own
from tests.polling import wait_for

PARTITIONS = 3


class _FailingNowAndThen:
    """The inbox's store, but every `every`th batch fails before it stores anything (as a lost
    database connection fails it): the consumer must read those records again."""

    def __init__(self, store: StoreOnOwnConnection, every: int):
        self._store, self._every, self._calls = store, every, 0
        self.stored = 0  # records stored (repeats included)

    def __call__(self, records: list[ConsumedRecord]) -> list[uuid.UUID]:
        self._calls += 1
        if self._calls % self._every == 0:
            raise ConnectionError("the inbox's database went away")
        new = self._store(records)
        self.stored += len(records)
        return new


@contextmanager
def _running(consumer: InboxConsumer, store: StoreOnOwnConnection) -> Iterator[None]:
    """`consumer` running in a thread until the block ends (then it commits what it stored and
    leaves the group), and `store`, what it stores through, closed after it."""
    running = threading.Thread(target=consumer.run)
    running.start()
    try:
        yield
    finally:
        consumer.stop()
        running.join(30)
        store.close()
    assert not running.is_alive()


@contextmanager
def _consuming(settings, topic: str, group: str) -> Iterator[_FailingNowAndThen]:
    """An inbox consumer of `group` on `topic` storing into the payments inbox, in a thread, until
    the block ends (then it commits what it stored and leaves the group); yields its store."""
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    failing = _FailingNowAndThen(store, every=5)
    consumer = InboxConsumer(build_consumer(settings, group), [topic], failing,
                             dispatch=lambda ids: None, batch_size=20)
    with _running(consumer, store):
        yield failing


def _produce(settings, topic: str, count: int, partition: int | None = None) -> set[str]:
    """`count` payment requests, each under a key of its own (to `partition`, if given); returns
    their message ids."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "enable.idempotence": True})
    message_ids = set()
    for _ in range(count):
        event = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": "u",
                                              "amount": Decimal("1.00")})
        producer.produce(topic, encode(event.to_json()), str(uuid.uuid4()).encode(),
                         headers={"message_id": str(event.message_id), "type": event.type},
                         **({} if partition is None else {"partition": partition}))
        message_ids.add(str(event.message_id))
    assert producer.flush(15) == 0
    return message_ids


def _stored(cursor, topic: str) -> dict[int, set[int]]:
    """The offsets of each partition of `topic` whose records the inbox holds."""
    cursor.execute('SELECT partition, "offset" FROM inbox_messages WHERE topic = %s', (topic,))
    stored: dict[int, set[int]] = {}
    for partition, offset in cursor.fetchall():
        stored.setdefault(partition, set()).add(offset)
    return stored


def _payments_database(settings):
    """A connection to the payments database whose every statement commits as it runs, to read
    its inbox with."""
    database = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    database.autocommit = True
    return database


def _all_in_inbox(database, message_ids: set[str]) -> bool:
    with database.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM inbox_messages WHERE message_id = ANY(%s)",
                       ([uuid.UUID(m) for m in message_ids],))
        return cursor.fetchone()[0] == len(message_ids)


def _committed(watcher: Consumer, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of `topic` that has one."""
    offsets = watcher.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    return {offset.partition: offset.offset for offset in offsets if offset.offset >= 0}


def test_consumers_joining_and_leaving_a_group_store_every_record_and_commit_only_what_is_stored(
        settings):
    """Two inbox consumers of one group, a second joining while the first consumes and leaving
    while records still come, one batch in five failing to store: every record is stored, and at
    every look the group's committed offset of a partition has every record below it in the inbox
    (a commit past them would skip them for good after the next rebalance)."""
    topic, admin = new_topic_of_its_own(settings, "rebalancing", PARTITIONS)
    group = f"{topic}.group"
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                        "enable.auto.commit": False})
    database = _payments_database(settings)
    looks = []

    def commits_hold_only_stored_records() -> None:
        committed = _committed(watcher, topic)
        with database.cursor() as cursor:
            stored = _stored(cursor, topic)
        for partition, offset in committed.items():
            assert set(range(offset)) <= stored.get(partition, set()), (partition, offset)
        looks.append(committed)

    def all_stored(message_ids: set[str]):
        def probe() -> bool:
            commits_hold_only_stored_records()
            return _all_in_inbox(database, message_ids)
        return probe

    try:
        produced = _produce(settings, topic, 300)
        with _consuming(settings, topic, group) as first:
            wait_for(lambda: (commits_hold_only_stored_records() or True) and _committed(
                watcher, topic), timeout=30, interval=0.2, what="the first consumer's commits")
            with _consuming(settings, topic, group) as second:  # joins: the group rebalances
                produced |= _produce(settings, topic, 300)
                wait_for(all_stored(produced), timeout=60, interval=0.2,
                         what="the records stored by both")
                produced |= _produce(settings, topic, 300)
            assert second.stored > 0  # it was given partitions
            # The second has left: the first takes its partitions back.
            stored_before = first.stored
            produced |= _produce(settings, topic, 300)
            wait_for(all_stored(produced), timeout=60, interval=0.2,
                     what="every record stored by the one left")
            assert first.stored >= stored_before + 300
        commits_hold_only_stored_records()
        final = _committed(watcher, topic)
        assert sum(final.values()) == len(produced)  # all committed once both have left
        assert len(looks) > 10
    finally:
        watcher.close()
        cleared_away(topic, admin, database)


class _ConsumeFailingOnce:
    """A client whose consume() raises once, and drops what it took, as confluent-kafka's does
    when a callback the client runs in it raises (an offset commit's answer, a rebalance's): the
    client reads on past them. (Forced so: a callback's own raise falls in whichever of poll() and
    consume() serves its event, as the broker's answers come.) Its first consume() takes on,
    waiting up to 15 s, till its messages and the one polled before it are of two partitions or
    more, then raises: a raise that lost only the polled message's partition's records would be
    made good by rewinding that partition alone. (consume(n, 0) takes only what the client holds
    already, often one partition's records, as each partition's first fetch comes once its offset
    is had: passed through, a raise waited for the first consume() to find two partitions' records
    held at once, which never came if each partition's came alone. Raised at the first, it drops
    records of a partition read nothing of since it was assigned, whose committed offset is asked.)

    Its first `lookups_failing` committed() raise, as when the group's coordinator is away."""

    def __init__(self, consumer: Consumer, lookups_failing: int = 0):
        self._consumer = consumer
        self._polled = None
        # (partition, offset) of the polled message and of each record the raising consume() took
        self.dropped: list[tuple[int, int]] = []
        self.lookups_failing, self.lookups_failed = lookups_failing, 0
        self.paused: list[int] = []  # each partition paused, as it was
        # Why the consume() to raise did not, if it did not: the test fails on it. (Raised here,
        # it would be the consumer's: logged, rewound after, consume() called again.)
        self.not_raised: str | None = None
        self.taking_on = threading.Event()  # set as the consume() to raise begins to take on

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list:
        if self.lookups_failed < self.lookups_failing:
            self.lookups_failed += 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the coordinator is away"))
        return self._consumer.committed(partitions, timeout=timeout)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused += [partition.partition for partition in partitions]
        self._consumer.pause(partitions)

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)

    def poll(self, timeout: float):
        self._polled = self._consumer.poll(timeout)
        return self._polled

    def consume(self, count: int, timeout: float) -> list:
        messages = self._consumer.consume(count, timeout)
        if self.dropped or self.not_raised or not self._raises_now():
            return messages
        self.taking_on.set()
        deadline = time.monotonic() + 15
        while True:
            unstored = [(m.partition(), m.offset()) for m in [self._polled, *messages]
                        if m is not None and m.error() is None]
            if self._enough_to_drop(unstored):
                break
            if time.monotonic() >= deadline or len(messages) >= count:
                self.not_raised = (f"no {self.to_drop} to drop in {len(messages)} records taken"
                                   f" (of {count} at most) or 15 s: {unstored}")
                return messages
            messages += self._consumer.consume(count - len(messages), 0.1)
        self.dropped = unstored
        raise RuntimeError("a callback raised in consume()")

    to_drop = "two partitions' records"

    def _raises_now(self) -> bool:
        """Whether this consume() is the one to raise (once it has taken on enough): the first."""
        return True

    def _enough_to_drop(self, unstored: list[tuple[int, int]]) -> bool:
        return len({partition for partition, _ in unstored}) >= 2


class _ConsumeFailingPastStored(_ConsumeFailingOnce):
    """A _ConsumeFailingOnce whose consume() to raise is the first once `armed`, after a poll of
    partition 1, taking on till it holds records of partition 0 too: those are dropped, and
    partition 0, read from before, goes back to one past the last record stored of it."""

    to_drop = "records of partition 0"

    def __init__(self, consumer: Consumer):
        super().__init__(consumer)
        self.armed = False

    def _raises_now(self) -> bool:
        polled = self._polled
        return (self.armed and polled is not None and polled.error() is None
                and polled.partition() == 1)

    def _enough_to_drop(self, unstored: list[tuple[int, int]]) -> bool:
        return any(partition == 0 for partition, _ in unstored)


class _StoringInOrder:
    """The inbox's store, noting the (partition, offset) of each record it stored, in order. Its
    first `failing` batches fail before storing anything (noted in `failed`), as a lost database
    connection fails them: the consumer rewinds to read them again."""

    def __init__(self, store: StoreOnOwnConnection, failing: int = 0):
        self._store, self.order = store, []
        self._failing, self.failed = failing, []

    def __call__(self, records: list[ConsumedRecord]) -> list[uuid.UUID]:
        if len(self.failed) < self._failing:
            self.failed.append([(record.partition, record.offset) for record in records])
            raise ConnectionError("the inbox's database went away")
        new = self._store(records)
        self.order += [(record.partition, record.offset) for record in records]
        return new


def _stored_before_earlier_ones(order: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The records of `order` first stored after a later record of their partition."""
    seen, highest, late = set(), {}, []
    for partition, offset in order:
        if (partition, offset) not in seen:
            seen.add((partition, offset))
            if offset < highest.get(partition, -1):
                late.append((partition, offset))
            highest[partition] = max(offset, highest.get(partition, -1))
    return late


@pytest.mark.parametrize("lookup_fails", [False, True], ids=["", "its-lookup-failing-once"])
def test_a_consume_that_raises_loses_no_record_of_any_partition(settings, lookup_fails):
    """The records a consume() that raised took, of any partition, and the one polled before it,
    are read again and stored: each partition goes back to where the consumer read on from (one
    past the last record it stored, or its committed offset, none read since it was assigned).
    The polled one was lost, and with it, past the next offset commit, the others for good.

    A partition whose committed offset could not be had is paused, and asked of again (5 s
    later) till it is rewound: its records produced meanwhile are not stored before those
    dropped (they were, and those dropped only at the next rebalance)."""
    topic, admin = new_topic_of_its_own(settings, "consume-raising", PARTITIONS)
    group = f"{topic}.group"
    # (All there before the consumer starts: the client fetches them as its partitions are
    # assigned, and sooner or later a poll's message and what consume() takes next are of two.)
    produced = _produce(settings, topic, 60)
    client = _ConsumeFailingOnce(build_consumer(settings, group),
                                 lookups_failing=1 if lookup_fails else 0)
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    storing = _StoringInOrder(store)
    consumer = InboxConsumer(client, [topic], storing, dispatch=lambda ids: None)
    database = _payments_database(settings)

    try:
        with _running(consumer, store):
            wait_for(lambda: client.dropped or client.not_raised, timeout=30, interval=0.1,
                     what="a consume() raising")
            assert not client.not_raised, client.not_raised
            if lookup_fails:
                produced |= _produce(settings, topic, 60)
            wait_for(lambda: _all_in_inbox(database, produced), timeout=30, interval=0.2,
                     what="every record stored")
    finally:
        cleared_away(topic, admin, database)
    assert _stored_before_earlier_ones(storing.order) == []
    if lookup_fails:  # (the raise dropped records of a partition not read since assigned)
        assert client.lookups_failed == 1
        assert client.paused


def test_a_consume_that_raises_rewinds_a_partition_read_from_to_one_past_its_last_stored_record(
        settings):
    """Partition 0's first records stored (none committed: commits an hour apart, so its committed
    offset is still its first record's), then a consume() after a poll of partition 1 takes records
    of partition 0 and raises: partition 0 goes back to one past its last stored record, neither to
    its committed offset (its stored records read and stored again) nor left where the client read
    on to (the records dropped lost). Every record is stored, each once."""
    topic, admin = new_topic_of_its_own(settings, "consume-past-stored", PARTITIONS)
    group = f"{topic}.group"
    produced = _produce(settings, topic, 20, partition=0)
    client = _ConsumeFailingPastStored(build_consumer(settings, group))
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    storing = _StoringInOrder(store)
    consumer = InboxConsumer(client, [topic], storing, dispatch=lambda ids: None,
                             commit_interval=3600)
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                        "enable.auto.commit": False})
    database = _payments_database(settings)

    try:
        with _running(consumer, store):
            wait_for(lambda: len(storing.order) >= 20, timeout=30, interval=0.1,
                     what="partition 0's first records stored")
            assert _committed(watcher, topic) == {}  # (rewound to it, they would be read again)
            client.armed = True
            # Partition 1's records alone, so that the next poll is of one of them; then, as its
            # consume() takes on, partition 0's next, which it drops.
            produced |= _produce(settings, topic, 20, partition=1)
            wait_for(lambda: client.taking_on.is_set() or client.not_raised, timeout=30,
                     interval=0.1, what="a consume() after a poll of partition 1")
            produced |= _produce(settings, topic, 20, partition=0)
            wait_for(lambda: client.dropped or client.not_raised, timeout=30, interval=0.1,
                     what="a consume() raising")
            assert not client.not_raised, client.not_raised
            assert (0, 20) in client.dropped  # (the first unstored record of partition 0)
            wait_for(lambda: _all_in_inbox(database, produced), timeout=30, interval=0.2,
                     what="every record stored")
        expected = {(0, offset) for offset in range(40)} | {(1, offset) for offset in range(20)}
        repeats = sorted({record for record in storing.order if storing.order.count(record) > 1})
        assert repeats == [], f"read and stored again: {repeats}"
        assert set(storing.order) == expected  # none lost
        with database.cursor() as cursor:
            assert _stored(cursor, topic) == {0: set(range(40)), 1: set(range(20))}
        assert _committed(watcher, topic) == {0: 40, 1: 20}  # (as it stopped)
    finally:
        watcher.close()
        cleared_away(topic, admin, database)


def _offsets_polled(client: Consumer, count: int) -> list[int]:
    """The offsets of the next `count` records `client` polls, all of partition 0 (its topic's
    only one holding any), waiting up to 30 s for them."""
    offsets = []

    def polled_enough() -> bool:
        message = client.poll(0.1)
        if message is not None and message.error() is None:
            assert message.partition() == 0, (message.partition(), message.offset())
            offsets.append(message.offset())
        return len(offsets) >= count

    wait_for(polled_enough, timeout=30, interval=0, what=f"{count} records polled")
    return offsets


def test_a_partition_sought_back_while_paused_is_read_on_from_there_once_resumed(settings):
    """On the real client and broker, a partition read up to offset 10 (its fetches further on,
    the rest held), then paused, sought back to 3 while paused, and resumed, is read on from 3:
    neither from 10 nor from where its fetches had got to. shared.inbox_consumer rests on it: a
    partition whose rewind's seek was refused is paused, sought again while paused, and resumed
    once that goes through (_rewind_again); a seek that a paused partition ignored would leave the
    records from the rewind's offset unread till the next rebalance, and those after them stored
    first."""
    topic, admin = new_topic_of_its_own(settings, "paused-seek", PARTITIONS)
    _produce(settings, topic, 20, partition=0)
    client = build_consumer(settings, f"{topic}.group")
    client.subscribe([topic])
    try:
        assert _offsets_polled(client, 10) == list(range(10))
        client.pause([TopicPartition(topic, 0)])
        client.seek(TopicPartition(topic, 0, 3))
        client.resume([TopicPartition(topic, 0)])
        assert _offsets_polled(client, 1) == [3]  # (10, had the seek not taken)
        assert _offsets_polled(client, 16) == list(range(4, 20))
    finally:
        client.close()
        admin.delete_topics([topic])


class _SeekRefusing(Consumer):
    """The real client, but its first `refusals` seeks raise, as librdkafka's does for a partition
    it is not fetching just then. Each seek (refused or gone through), pause and resume is noted in
    `calls`, by partition, as it was."""

    def __init__(self, config: dict, refusals: int):
        super().__init__(config)
        self.refusals, self.calls = refusals, []

    def seek(self, partition: TopicPartition) -> None:
        where = (partition.partition, partition.offset)
        if self.refusals:
            self.refusals -= 1
            self.calls.append(("seek refused", where))
            raise KafkaException(KafkaError(KafkaError._STATE, "partition not fetched"))
        super().seek(partition)
        self.calls.append(("seek", where))

    def pause(self, partitions: list[TopicPartition]) -> None:
        super().pause(partitions)
        self.calls.append(("pause", [partition.partition for partition in partitions]))

    def resume(self, partitions: list[TopicPartition]) -> None:
        super().resume(partitions)
        self.calls.append(("resume", [partition.partition for partition in partitions]))


def test_a_partition_whose_rewind_was_refused_is_read_again_from_there_once_sought_while_paused(
        settings):
    """A batch of partition 0 fails to store, and its rewind's seek is refused, then refused
    again before the next poll: the partition is paused (the client read on past the batch, and
    held more), sought again while paused before each poll till the seek goes through, then
    resumed. On the real client and broker that seek takes: the partition's records are stored
    from the failed batch's first on, in order, each once, none skipped (a seek a paused partition
    ignored would have it read on past the batch's records, unread till the next rebalance)."""
    topic, admin = new_topic_of_its_own(settings, "refused-rewind", PARTITIONS)
    produced = _produce(settings, topic, 20, partition=0)
    client = _SeekRefusing(consumer_config(settings, f"{topic}.group"), refusals=2)
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    storing = _StoringInOrder(store, failing=1)
    consumer = InboxConsumer(client, [topic], storing, dispatch=lambda ids: None, batch_size=5)
    database = _payments_database(settings)
    try:
        with _running(consumer, store):
            # (The last record: the batch's, had the seek not taken, would never come after it.)
            wait_for(lambda: (0, 19) in storing.order, timeout=30, interval=0.1,
                     what="partition 0's last record stored")
        [failed] = storing.failed
        rewound_to = failed[0][1]
        assert storing.order == [(0, offset) for offset in range(rewound_to, 20)]
        assert client.calls[:5] == [("seek refused", (0, rewound_to)), ("pause", [0]),
                                    ("seek refused", (0, rewound_to)), ("seek", (0, rewound_to)),
                                    ("resume", [0])]
        assert _all_in_inbox(database, produced)
    finally:
        cleared_away(topic, admin, database)


class _NotingWhatServes(Consumer):
    """The real client, noting which of its calls is running (`serving`: "poll", "consume" or
    None), for a callback it runs to say which served it."""

    serving: str | None = None

    def poll(self, timeout: float):
        self.serving = "poll"
        try:
            return super().poll(timeout)
        finally:
            self.serving = None

    def consume(self, num_messages: int, timeout: float) -> list:
        self.serving = "consume"
        try:
            return super().consume(num_messages, timeout)
        finally:
            self.serving = None


def test_a_callback_raising_in_poll_loses_no_record(settings):
    """The answer to the first offset commit, served in a poll() of 0.5 s, raises (a mistake in
    note_commit_result, say; the rebalance callbacks are served there too) as a record has come:
    confluent-kafka destroys the record that poll() took, its position already past it. The
    partition goes back to where the consumer read on from, and the record is stored (it was
    lost: never stored nor swept, the group's offset committed past it with the next records').
    (confluent-kafka 2.16 polls in chunks of 200 ms: the callback's raise ends the first, and the
    record is taken in the next, before the raise is seen. A poll of 0.2 s is one chunk, which the
    raise ends with nothing taken.)"""
    topic, admin = new_topic_of_its_own(settings, "poll-raising", 1)
    group = f"{topic}.group"
    produced = _produce(settings, topic, 1)  # offset 0
    raised_in: list[str | None] = []
    consumer: InboxConsumer | None = None

    def on_commit(error, partitions) -> None:
        if not raised_in:
            # Offset 1 produced, and held by the client (its fetch's high watermark is past it),
            # before the answer to the commit of offset 0's raises.
            produced.update(_produce(settings, topic, 1))
            wait_for(lambda: client.get_watermark_offsets(
                TopicPartition(topic, 0), cached=True)[1] >= 2, timeout=10, interval=0.01,
                what="offset 1 fetched")
            raised_in.append(client.serving)
            raise RuntimeError("a mistake in handling an offset commit's answer")
        consumer.note_commit_result(error, partitions)

    client = _NotingWhatServes(consumer_config(settings, group, on_commit))
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    storing = _StoringInOrder(store)
    consumer = InboxConsumer(client, [topic], storing, dispatch=lambda ids: None,
                             poll_timeout=0.5, commit_interval=0.0)
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                        "enable.auto.commit": False})
    database = _payments_database(settings)
    try:
        with _running(consumer, store):
            wait_for(lambda: raised_in, timeout=30, interval=0.1, what="on_commit raising")
            assert raised_in == ["poll"]
            produced |= _produce(settings, topic, 1)  # offset 2, after the raise
            wait_for(lambda: (0, 2) in storing.order, timeout=30, interval=0.1,
                     what="offset 2 stored")
        assert storing.order == [(0, 0), (0, 1), (0, 2)]  # (offset 1 lost: [(0, 0), (0, 2)])
        assert _all_in_inbox(database, produced)
        assert _committed(watcher, topic) == {0: 3}
    finally:
        watcher.close()
        cleared_away(topic, admin, database)
