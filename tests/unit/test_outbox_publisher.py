"""Which rows OutboxPublisher counts as acknowledged, with a stand-in producer (pure logic, no I/O).

The real producer against the real broker is tested in tests/integration/test_outbox.py; what is
checked here are the failures that broker cannot be made to produce on demand.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from shared.config import SERVICES, load_settings
from shared.outbox import publishing
from shared.outbox.relaying import UNKNOWN_TOPIC_ERROR_BEGINS, Refusal


class FailedDelivery:
    def __init__(self, value: str):
        self._value = value.encode()

    def value(self) -> bytes:
        return self._value


class StandInProducer:
    """Takes messages until `refuse_at` (raising KafkaException there), then on flush reports
    the failures in `fail` through the configured delivery callback, as librdkafka does with
    delivery.report.only.error; `left_queued` is what flush leaves unanswered. With
    `topic_limit`, the messages of a flush go as one record batch, refused whole (each of its
    messages failed as too large) when any of them is longer, as the broker refuses one over the
    topic's max.message.bytes. A producer made in place of another answers as it did (`fail`,
    `too_large`, `topic_limit`: the broker's answers, and the producer's own limit)."""

    made: list[StandInProducer] = []

    def __init__(self, config: dict):
        assert config["delivery.report.only.error"] is True
        self.report = config["on_delivery"]
        self.produced: list[str] = []
        self.unflushed: list[str] = []
        self.refuse_at: int | None = None
        self.too_large: set[str] = set()  # values refused at once, as librdkafka refuses them
        self.fail: dict[str, KafkaError] = {}
        self.topic_limit: int | None = None
        if StandInProducer.made:
            before = StandInProducer.made[-1]
            self.too_large, self.fail = before.too_large, before.fail
            self.topic_limit = before.topic_limit
        self.left_queued = 0
        self.queue_full_for = 0  # produce calls turned away, as by a full local queue
        self.polls = 0
        self.closed = False
        StandInProducer.made.append(self)

    def produce(self, topic, value, key, headers):
        if self.queue_full_for:
            self.queue_full_for -= 1
            raise BufferError("Local: Queue full")
        if len(self.produced) == self.refuse_at:
            raise KafkaException(KafkaError(KafkaError._STATE, "producer fenced", fatal=True))
        if value in self.too_large:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        self.produced.append(value)
        self.unflushed.append(value)

    def poll(self, timeout):
        self.polls += 1
        return 0

    def purge(self):
        self.unflushed, self.left_queued = [], 0

    def close(self):
        self.closed = True

    def flush(self, timeout):
        batch, self.unflushed = self.unflushed, []
        if self.topic_limit is not None and any(len(v) > self.topic_limit for v in batch):
            for value in batch:
                self.report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "batch too large"),
                            FailedDelivery(value))
            return self.left_queued
        for value in batch:
            if value in self.fail:
                self.report(self.fail[value], FailedDelivery(value))
        return self.left_queued


def _rows(count: int) -> list[tuple]:
    return [(n, "topic", "key", f"m{n}", "PaymentRequested", None, f'{{"message_id":"m{n}"}}')
            for n in range(1, count + 1)]


def _keyed_rows(*keys: str) -> list[tuple]:
    return [(n, "topic", key, f"m{n}", "PaymentRequested", None, f'{{"message_id":"m{n}"}}')
            for n, key in enumerate(keys, start=1)]


def _all_produced() -> list[str]:
    """The messages every producer made took, in turn."""
    return [value for producer in StandInProducer.made for value in producer.produced]


@pytest.fixture
def publisher(monkeypatch):
    StandInProducer.made.clear()
    monkeypatch.setattr(publishing, "Producer", StandInProducer)
    return publishing.OutboxPublisher(load_settings({}), "orders", topics=["topic"])


def test_rows_with_no_failure_reported_are_acknowledged(publisher):
    assert publisher.send_batch(_rows(3)) == {}
    assert len(StandInProducer.made) == 1
    assert publisher.send_batch(_rows(2)) == {}
    assert len(StandInProducer.made) == 1  # one producer for batch after batch


def test_a_failed_delivery_refuses_its_own_row_only(publisher):
    rows = _rows(3)
    publisher._get_producer().fail = {
        rows[1][6]: KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")}
    assert publisher.send_batch(rows) == {
        2: Refusal("TOPIC_AUTHORIZATION_FAILED: not authorized", answered=True)}
    assert len(StandInProducer.made) == 1  # an ordinary refusal keeps the producer


def test_a_row_a_full_local_queue_turns_away_waits_for_room_and_goes_in_its_turn(publisher):
    producer = publisher._get_producer()
    rows = _rows(3)
    producer.queue_full_for = 2
    assert publisher.send_batch(rows) == {}
    assert producer.produced == [row[6] for row in rows]
    assert producer.polls == 2  # (a poll, to let deliveries drain, before each try again)
    # Refused once there is room: refused as any row, holding back the rows of its key.
    producer.queue_full_for, producer.too_large = 1, {rows[0][6]}
    refused = publisher.send_batch(rows)
    assert refused[1].park and refused[2].held and refused[3].held
    assert len(StandInProducer.made) == 1


def test_rows_the_producer_would_not_take_are_refused_and_a_fatal_error_replaces_it(publisher):
    publisher._get_producer().refuse_at = 1
    refused = publisher.send_batch(_rows(3))
    assert set(refused) == {2, 3}
    assert all("producer fenced" in r.error and not r.held for r in refused.values())
    publisher.send_batch(_rows(1))
    assert len(StandInProducer.made) == 2


def test_a_message_the_producer_will_not_take_holds_back_its_key_only(publisher):
    rows = [(n, "topic", key, f"m{n}", "PaymentRequested", None, f'{{"message_id":"m{n}"}}')
            for n, key in enumerate(["ann", "bob", "ann", "cy", "bob"], start=1)]
    producer = publisher._get_producer()
    producer.too_large = {rows[0][6]}
    refused = publisher.send_batch(rows)
    assert set(refused) == {1, 3}  # ann's message and the one of hers behind it
    assert refused[1].error.startswith("not produced:") and refused[1].held and refused[1].park
    assert refused[3].error.startswith("held back") and refused[3].held and not refused[3].park
    assert producer.produced == [rows[1][6], rows[3][6], rows[4][6]]
    assert len(StandInProducer.made) == 1  # not fatal: the producer is kept
    producer.too_large = {rows[0][6], rows[1][6], rows[3][6]}
    publisher.send_batch(rows[:2])  # nothing produced at all, nothing unanswered
    assert len(StandInProducer.made) == 1


def test_a_message_refused_for_the_brokers_state_is_tried_again_not_parked(publisher):
    """A producer whose metadata says the topic is gone (a broker that came back empty) refuses
    at once too: that is the broker's to mend, and the relay checks the topics and retries."""
    rows = _rows(2)
    producer = publisher._get_producer()
    produce = producer.produce

    def topic_gone_for_the_first(topic, value, key, headers):
        if value == rows[0][6]:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "unknown topic"))
        produce(topic, value, key, headers)

    producer.produce = topic_gone_for_the_first
    refused = publisher.send_batch(rows)
    assert set(refused) == {1, 2}
    assert refused[2].error.startswith("held back")  # behind the first: the same key
    assert producer.produced == []
    assert not any(r.park or r.held for r in refused.values())
    # The second, never tried, answered as the row it waits behind: no sign of a broker out of
    # reach (for the leader's count towards stepping down).
    assert refused[1].answered and refused[2].answered


@pytest.mark.parametrize("code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION,
                                  KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.INVALID_TIMESTAMP,
                                  KafkaError.UNKNOWN, KafkaError._UNKNOWN_TOPIC])
def test_a_message_the_broker_refuses_for_its_topic_or_state_is_refused_with_an_answer(
        publisher, code):
    """The broker's own error codes (and librdkafka's word, from the broker's metadata, that the
    topic does not exist) say that the producer reaches it: a leader does not step down over
    them (tasks/relay.py). Those not about the record alone are tried again, not parked (an
    invalid timestamp is the clocks' skew, say)."""
    rows = _rows(2)
    publisher._get_producer().fail = {rows[0][6]: KafkaError(code, "refused")}
    refused = publisher.send_batch(rows)
    assert set(refused) == {1} and refused[1].answered and not refused[1].held


@pytest.mark.parametrize("code", [KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT,
                                  KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE])
def test_a_message_with_no_answer_from_the_broker_is_refused_without_one(publisher, code):
    rows = _rows(2)
    publisher._get_producer().fail = {row[6]: KafkaError(code, "no answer") for row in rows}
    refused = publisher.send_batch(rows)
    assert set(refused) == {1, 2} and not any(r.answered or r.held for r in refused.values())


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD])
def test_a_message_the_broker_refuses_for_its_record_is_parked(publisher, code):
    """Over the topic's max.message.bytes, though under the producer's own limit, or failing the
    broker's validation: the broker answers in the delivery report, and will answer the same
    every time."""
    rows = _rows(2)
    producer = publisher._get_producer()
    producer.fail = {rows[0][6]: KafkaError(code, "refused")}
    refused = publisher.send_batch(rows)
    assert set(refused) == {1} and refused[1].park and refused[1].held and refused[1].answered
    assert refused[1].error.startswith(KafkaError(code).name())


def test_of_a_record_batch_refused_as_too_large_only_the_message_too_large_alone_is_parked(
        publisher):
    """librdkafka fails every message of a batch the broker refuses for its size: each is sent
    again alone, the one still refused is parked and holds back its key, the others go."""
    rows = _keyed_rows("ann", "bob", "ann", "cy")
    rows[1] = (*rows[1][:6], rows[1][6] + " " * 100)  # bob's message: over the topic's limit
    producer = publisher._get_producer()
    producer.topic_limit = 50
    refused = publisher.send_batch(rows)
    assert set(refused) == {2} and refused[2].park and refused[2].held
    assert _all_produced() == [row[6] for row in rows] + [row[6] for row in rows]
    # Each sent alone on a producer the broker had refused nothing: a fresh one before the
    # first, another after bob's; the old ones closed, the last kept for the next batch.
    assert [p.produced for p in StandInProducer.made[1:]] == [[rows[0][6], rows[1][6]],
                                                             [rows[2][6], rows[3][6]]]
    assert [p.closed for p in StandInProducer.made] == [True, True, False]
    bobs = rows[1][:2] + ("bob",) + rows[1][3:]
    refused = publisher.send_batch([rows[0], bobs, (5, "topic", "bob", "m5", "PaymentRequested",
                                                    None, '{"message_id":"m5"}'), rows[3]])
    assert set(refused) == {2, 5}  # bob's later message waits behind his parked one
    assert refused[5].error.startswith("held back") and not refused[5].park
    assert len(StandInProducer.made) == 5


def test_rows_sent_alone_take_a_bounded_number_of_fresh_producers(publisher):
    """A producer whose message the broker refused is replaced before the next row sent alone
    (Tansu fences its bumped epoch), FRESH_PRODUCERS_ALONE at most for a batch: the rows past
    them wait for a later batch, neither parked nor held (the ones parked by then out of it)."""
    count = publishing.FRESH_PRODUCERS_ALONE + 2
    rows = _keyed_rows(*(f"key{n}" for n in range(count)))  # every one refused alone
    publisher._get_producer().fail = {
        row[6]: KafkaError(KafkaError.INVALID_RECORD, "invalid record") for row in rows}
    refused = publisher.send_batch(rows)
    assert set(refused) == {row[0] for row in rows}
    sent_alone = rows[:publishing.FRESH_PRODUCERS_ALONE]
    assert all(refused[row[0]].park for row in sent_alone)
    for row in rows[publishing.FRESH_PRODUCERS_ALONE:]:
        assert not refused[row[0]].park and not refused[row[0]].held
        assert "not sent alone" in refused[row[0]].error and refused[row[0]].answered
    assert len(StandInProducer.made) == 1 + publishing.FRESH_PRODUCERS_ALONE
    assert all(p.closed for p in StandInProducer.made)  # (the last too: it was refused)


def test_rows_of_a_batch_refused_as_too_large_wait_once_the_time_is_up(publisher, monkeypatch):
    rows = _rows(3)
    producer = publisher._get_producer()
    producer.topic_limit = 0  # every batch refused
    monkeypatch.setattr(publishing, "FLUSH_TIMEOUT_S", 0.0)  # no time left to send any alone
    refused = publisher.send_batch(rows)
    assert set(refused) == {1, 2, 3}
    assert not any(r.park or r.held for r in refused.values())  # tried again later, in a batch
    assert "not sent alone in time" in refused[1].error
    assert all(r.answered for r in refused.values())  # (their batch was: refused as too large)


def test_a_message_without_a_key_the_producer_will_not_take_holds_nothing_back(publisher):
    """Keyless messages go to any partition: there is no order among them to keep."""
    rows = [(n, "topic", None, f"m{n}", "PaymentRequested", None, f'{{"message_id":"m{n}"}}')
            for n in (1, 2)]
    publisher._get_producer().too_large = {rows[0][6]}
    refused = publisher.send_batch(rows)
    assert set(refused) == {1} and refused[1].park


def test_a_producer_in_a_fatal_state_is_replaced(publisher):
    """librdkafka answers with the code _FATAL once its producer is fatally failed, and sets
    fatal() only on errors passed to an error callback."""
    rows = _rows(2)

    def fatally_failed(topic, value, key, headers):
        raise KafkaException(KafkaError(KafkaError._FATAL, "fatal error"))

    publisher._get_producer().produce = fatally_failed
    refused = publisher.send_batch(rows)
    assert set(refused) == {1, 2} and not any(r.held for r in refused.values())
    publisher.send_batch(_rows(1))
    assert len(StandInProducer.made) == 2


def _a_bug_in_flush(producer) -> None:
    def flush(timeout):
        raise RuntimeError("a bug in flush")

    producer.flush = flush


def _a_bug_in_the_delivery_callback(producer) -> None:
    def report(err, msg):
        raise RuntimeError("a bug in the delivery callback")

    producer.report = report
    producer.fail = {_rows(1)[0][6]: KafkaError(KafkaError.INVALID_RECORD, "invalid record")}


def _a_system_error_from_an_error_not_fatal(producer) -> None:
    def flush(timeout):
        error = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
        raise SystemError("a bug") from KafkaException(error)

    producer.flush = flush


def _a_system_error_while_a_fatal_error_is_handled(producer) -> None:
    def flush(timeout):
        try:
            raise KafkaException(KafkaError(KafkaError._STATE, "producer fenced", fatal=True))
        except KafkaException:
            raise SystemError("a bug")  # (its context the fatal error, not its cause)

    producer.flush = flush


@pytest.mark.parametrize("break_producer", [
    _a_bug_in_flush, _a_bug_in_the_delivery_callback, _a_system_error_from_an_error_not_fatal,
    _a_system_error_while_a_fatal_error_is_handled])
def test_an_error_not_caused_by_a_fatal_one_escapes_and_the_producer_is_kept(
        publisher, break_producer):
    """Only a fatal error of the producer's refuses the batch: any other exception is a bug,
    which a refusal, retried for ever, would hide. A SystemError counts only when confluent-kafka
    raised it from a fatal error (its cause), not one raised while a fatal error was handled."""
    producer = publisher._get_producer()
    break_producer(producer)
    with pytest.raises((RuntimeError, SystemError), match="a bug"):
        publisher.send_batch(_rows(2))
    assert publisher._get_producer() is producer
    assert len(StandInProducer.made) == 1


def test_a_flush_that_leaves_messages_unanswered_acknowledges_none(publisher):
    publisher._get_producer().left_queued = 1
    refused = publisher.send_batch(_rows(2))
    assert refused == {1: Refusal("no acknowledgement from the broker in time"),
                       2: Refusal("no acknowledgement from the broker in time")}
    publisher.send_batch(_rows(1))
    assert len(StandInProducer.made) == 2  # a producer that answered nothing starts afresh


def test_a_live_relay_leader_is_never_idle_long_enough_to_lose_its_session():
    """The leader's longest idle stretch (a batch waiting on the broker, then its topic check,
    then a wait) stays well under the idle timeout that ends a stalled leader's session."""
    from shared.outbox.publishing import FLUSH_TIMEOUT_S
    from shared.relay_leader import LEADER_IDLE_TIMEOUT_SECONDS
    from tasks.relay import RECHECK_SECONDS, TOPIC_CHECK_TIMEOUT_SECONDS

    longest_idle = FLUSH_TIMEOUT_S + 2 * TOPIC_CHECK_TIMEOUT_SECONDS + RECHECK_SECONDS
    assert 2 * longest_idle <= LEADER_IDLE_TIMEOUT_SECONDS


def test_the_relay_is_told_to_stop_however_its_worker_stops():
    """Warm (`stop`) or cold (`terminate`, which Celery calls instead on an unrecoverable error):
    the pool waits for the leading thread, which leads until told to stop."""
    from types import SimpleNamespace

    from tasks import relay

    step = relay.StopLeadingStep(SimpleNamespace())
    try:
        for stopping in (step.stop, step.terminate):
            relay._stopping.clear()
            stopping(SimpleNamespace())
            assert relay._stopping.is_set(), stopping
    finally:
        relay._stopping.clear()


def test_a_row_naming_a_topic_not_among_the_publishers_is_parked_unproduced_and_holds_its_key(
        publisher):
    rows = _rows(3)
    rows[0] = (1, "renamed-away", "key", *rows[0][3:])
    rows[1] = (2, "renamed-away", "key", *rows[1][3:])
    refused = publisher.send_batch(rows)
    assert refused[1].park and "(Its topic 'renamed-away';" in refused[1].error
    # Both ways out, for the service whose outbox it is (not a SERVICE to fill in), within the
    # 200 characters `list` shows: renamed since, or a newer release's row.
    shown = refused[1].error[:200]
    assert "Renamed? python -m tasks.parked replay orders --outbox --to-topic TOPIC ID" in shown
    assert "After the upgrade: python -m tasks.parked replay orders --outbox ID." in shown
    assert "SERVICE" not in refused[1].error
    assert refused[2].held and not refused[2].park  # behind it, its topic and key
    assert 3 not in refused  # another topic's row goes
    assert publisher._get_producer().produced == [rows[2][6]]


@pytest.mark.parametrize("service", SERVICES)
def test_both_ways_out_of_a_topic_not_the_shops_are_shown_whole_by_list(service):
    """`python -m tasks.parked list` shows an error's first 200 characters: both commands fit
    in them, for any service and however long the topic's name (it comes after them)."""
    from tasks.parked import _one_line

    for topic in ("hseshop.orders.payment-requested", "x" * 300):
        error = publishing.UNKNOWN_TOPIC_ERROR.format(
            topic=topic, service=service,
            topics="hseshop.orders.order-status-changed, hseshop.orders.payment-requested,"
                   " hseshop.payments.payment-results")
        shown = _one_line(error)
        assert error.startswith(UNKNOWN_TOPIC_ERROR_BEGINS)
        assert f"python -m tasks.parked replay {service} --outbox --to-topic TOPIC ID" in shown
        assert f"python -m tasks.parked replay {service} --outbox ID." in shown
