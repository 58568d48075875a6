"""Publishing outbox rows to Kafka: OutboxPublisher sends a relay's batch with an idempotent
producer, waits for every acknowledgement, and says why each row the broker did not take was
refused: to be tried again, held back behind a refused row of its key, or parked.

A batch goes in two passes: every row produced, then flushed; the rows of record batches the broker
refused for a record in them are then sent again one at a time, to learn which record it was,
each on a producer the broker has refused nothing (Tansu fences one that it has). A refusal says
whether it parks its row (the broker's answer about the record itself, the same every time:
_RECORD_REFUSED_FOR_GOOD; a topic not the shop's: UNKNOWN_TOPIC_ERROR) and whether the broker
answered at all. A fatal error of the producer, however confluent-kafka raises it, refuses the
whole batch and replaces the producer, its tracebacks dropped so that the old one is let go.

A key keeps its order across batches, not always within one: a row refused in its delivery report
may already have been overtaken by the later rows of its key in the same batch. librdkafka sends a
partition's messages in several produce requests, up to five in flight, and one it fails for good
(an answer it does not retry: an invalid timestamp or record, a record batch too large, a topic the
relay may not write to; or its messages timed out) stops none after it: it bumps the producer's
epoch and sends them on (a real broker refuses those in flight for the gap in the producer's
sequence numbers, and librdkafka sends them again). The rows in them are acknowledged and
deleted, and the refused row goes later, after them: consumers see K1, K3, K2. Measured against
librdkafka's mock cluster (2.16, as confluent-kafka bundles it), with the relay's own settings: a
batch of 25,000 rows, every hundredth of one key, its second produce request refused as
INVALID_TIMESTAMP: 188 and 230 rows of the key after its first refused one were written and
acknowledged, in two runs. With one message a request, the second refused (INVALID_TIMESTAMP,
INVALID_RECORD, TOPIC_AUTHORIZATION_FAILED), the 1st, 3rd, 4th and 5th were written, and so with
`max.in.flight=1` too: it only makes the next request wait for the refused one's answer. What
would keep the order is not set, each for a cost measured or reckoned:
- `enable.gapless.guarantee` (experimental; not for messages timed out) makes every refusal
  librdkafka does not retry a fatal error. A real broker refuses the requests after the gap in
  the producer's sequence numbers (OUT_OF_ORDER_SEQUENCE_NUMBER, librdkafka's INTRODUCTION.md),
  but the mock cluster checks them for transactional producers only: there, with one message a
  request, those already in flight were still written and acknowledged before flush() raised the
  fatal error (OutboxPublisher then refuses the batch whole, and they go again after the refused
  row: their first copies, which consumers keep, came first all the same). And it costs what the
  relay promises: a row refused for what it is (an invalid record, one too large, a topic it may
  not write to) would refuse its whole batch at every try, nothing parked and no other row sent
  (each is fatal so on the mock; tests/unit/test_outbox_publisher_record_refusals.py fails with
  it, the batch's five rows all refused, none parked).
- A key's next row handed to the producer only once the row before it has its answer: sound, but
  a flush for each row of the busiest key in a batch, many through a backlog (the key is a user).

The relay's reading, counting and deleting of rows is shared.outbox.relaying's; the Kafka clients'
settings are shared.kafka's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator

from confluent_kafka import KafkaError, KafkaException, Producer

from shared.config import Settings
from shared.kafka import MESSAGE_TIMEOUT_MS, producer_config
from shared.outbox.relaying import UNKNOWN_TOPIC_ERROR_BEGINS, Refusal, RelayRow, relay_headers

log = logging.getLogger(__name__)

# librdkafka gives up on a message after MESSAGE_TIMEOUT_MS; the relay waits a little longer than
# this so that every message gets a definite answer and none is left queued to be sent twice.
FLUSH_TIMEOUT_S = MESSAGE_TIMEOUT_MS / 1000 + 5

# OutboxPublisher.close waits at most this long for the reports of the messages it purged, which
# librdkafka serves at once: a bound for a producer that misbehaves, not a wait.
CLOSE_TIMEOUT_S = 5.0

# A row sent again alone (OutboxPublisher._send_each_alone) is sent only while this long is left of
# its batch's time, so that it too gets its definite answer before the batch's time is up.
ALONE_NEEDS_S = MESSAGE_TIMEOUT_MS / 1000 + 1

# The rows of a batch sent again alone (OutboxPublisher._send_each_alone) take at most this many
# fresh producers: one before the first, and one after each refused (librdkafka bumps the epoch of
# an idempotent producer whose message the broker refused, and Tansu fences the bumped epoch).
# Each costs a connection, an InitProducerId round trip (librdkafka asks for the producer id on a
# timer: a fresh producer's first message took 0.5 to 1 s against Tansu) and, on Apache Kafka, a
# producer id whose state the broker keeps for a while (producer.id.expiration.ms, a day by
# default). The rows past them are tried again in a later batch, those parked by then out of it:
# a batch parks this many rows at most. (ALONE_NEEDS_S bounds them by time too.)
FRESH_PRODUCERS_ALONE = 5


class OutboxPublisher:
    """Sends outbox rows to Kafka and reports, row by row, the ones the broker did not take.

    One idempotent producer, used by one relay thread at a time (a service's relay leader); it is
    rebuilt after a fatal error, as librdkafka requires, after a batch of which it had nothing
    acknowledged, and for the rows of a batch sent again alone (_send_each_alone). The producer
    reports failed deliveries only: a row is acknowledged when the producer has flushed with no
    failure reported for it, so the hundred thousand successes of a busy minute cost no callback
    each.

    It sends only to `topics`, by default the shop's (its TOPIC_* settings, and
    OUTBOX_EXTRA_TOPICS): a row naming
    another was written under a setting since renamed (rows wait in the outbox across a release),
    and sent as it is it would go where no consumer of the shop reads (a broker creating topics
    on first use takes it, and the message is lost to the shop) or, topics not created on first
    use, time out, for ever, every try holding up its whole batch for the producer's message
    timeout. It is parked instead (UNKNOWN_TOPIC_ERROR, naming `service`, whose outbox it reads),
    for an operator to send on to the topic it is meant for (`python -m tasks.parked replay
    SERVICE --outbox --to-topic TOPIC`), or, a newer release's row that a relay of the release
    before parked in a rolling upgrade, to hand back once the relays know its topic (`replay
    SERVICE --outbox`).
    """

    def __init__(self, settings: Settings, service: str, topics: Collection[str] | None = None):
        self._settings = settings
        self._service = service
        self._topics = frozenset(settings.relayed_topics() if topics is None else topics)
        self._producer: Producer | None = None
        # message value -> why the broker did not take it, filled by the delivery callback (a
        # value names its row: it holds the message id; reports of failures carry no headers).
        self._failed: dict[bytes, KafkaError] = {}

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer({**producer_config(self._settings),
                                       "delivery.report.only.error": True,
                                       "on_delivery": _noting_failures_in(self._failed)})
        return self._producer

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Release the producer, its threads and connections with it, now (a second call, or one
        on a publisher that has not sent, does nothing; a publisher that sends again makes a new
        producer).

        What the producer still holds belongs to a batch that gave up on it (each batch flushes
        before it returns): its rows stay in the outbox, to be sent again, so it is purged, not
        waited for. Once the purged messages' reports are served, within `timeout`, the producer
        is closed (confluent-kafka's close(), which destroys it whatever else still refers to it;
        called earlier, it would wait for them with no bound). One still holding messages after
        that is only let go, for its dealloc to destroy it without waiting.

        A producer that fails as it is closed (one failed fatally raises its error) is said in a
        warning and let go, never raised: its owner closes it as it ends, often on its way out of
        an error of its own, which this must not hide."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.purge()
            left = producer.flush(timeout)
            if not left:
                producer.close()
                return
            log.warning("the %s outbox producer still held %d message(s) %.0f s after they were"
                        " purged, and is let go", self._service, left, timeout)
        except Exception as exc:
            _let_go_of_frames(exc)  # (confluent-kafka keeps it: its frames hold the producer)
            error = _fatal_error_raised_by(exc)
            said = (f"{error.name()}: {error.str()}" if error is not None
                    else f"{type(exc).__name__}: {exc}")
            log.warning("the %s outbox producer failed as it was closed, and is let go: %s",
                        self._service, said)

    def send_batch(self, rows: list[RelayRow]) -> dict[int, Refusal]:
        """Produce `rows` and wait until each has an answer; returns why each row the broker did
        not acknowledge was refused.

        A message the producer itself will never take (one over its `message.max.bytes`), or that
        names a topic not among `topics` (never produced), comes back as one to park
        (`Refusal.park`), as does one the broker refuses for its record, the same answer every
        time (_RECORD_REFUSED_FOR_GOOD), and holds back the rows after it with its topic and
        key, which must not overtake it, and no others: one row that can never be sent stops its
        key, not the relay (a row without a key has no order to keep, and holds nothing back).
        Any other refusal at produce time is the broker's to answer for (a topic its metadata no
        longer has, say), retried later, and holds back the rows of its key the same way, unless
        the producer has failed fatally: that refuses the whole batch (below). (A message the
        broker refuses later, in its delivery report, holds nothing of this batch back: the rows
        after it may already be on their way, and those of its key in a later produce request
        are then written before it is tried again, out of its key's order (the module's
        docstring says why it is left so); the later reads hold back its key,
        shared.outbox.relaying.CLAIM_ROWS. The rows of a record batch it refuses for a record in
        it, too large or invalid, are each sent again alone, to learn which it is:
        `_send_each_alone`.) A refusal says whether the broker answered with it
        (`Refusal.answered`: `_answered`), or gave no answer at all (a message timed out).

        A producer that fails fatally as it sends (an idempotent producer's sequence numbers out
        of step with the broker's, say), or has failed before (its produce() then refuses with
        _FATAL), refuses the whole batch, none of it counted as sent, and is replaced:
        confluent-kafka raises a fatal error from flush() or poll(), rather than passing it to a
        callback, and cuts their delivery reports short, so that no row of the batch has a
        definite answer (a row sent before the error goes again: consumers dedup).
        """
        producer = self._get_producer()
        try:
            return self._send(producer, rows)
        except Exception as exc:
            error = _fatal_error_raised_by(exc)
            if error is None:
                raise
            _let_go_of_frames(exc)
            log.error("the %s outbox producer failed fatally, and is replaced: %s: %s",
                      self._service, error.name(), error.str())
            self._producer = None
            refusal = Refusal(f"the producer failed fatally: {error.name()}: {error.str()}",
                              answered=_answered(error))
            return {row[0]: refusal for row in rows}

    def _send(self, producer: Producer, rows: list[RelayRow]) -> dict[int, Refusal]:
        """send_batch's work, but for a fatal error raised: see there."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        self._failed.clear()  # late answers about an earlier batch that timed out
        refused: dict[int, Refusal] = {}
        held_back: dict[tuple[str, str], Refusal] = {}  # (topic, key) -> why
        produced: list[RelayRow] = []
        fatal: Refusal | None = None  # why every row after a fatal error is refused
        for row in rows:
            row_id, topic, key = row[:3]
            refusal = fatal or held_back.get((topic, key))
            if refusal:
                refused[row_id] = refusal
                continue
            if topic not in self._topics:
                _refuse_for_good(refused, held_back, row, UNKNOWN_TOPIC_ERROR.format(
                    topic=topic, service=self._service, topics=", ".join(sorted(self._topics))))
                continue
            try:
                self._produce(producer, row)
            except KafkaException as exc:
                log.warning("the outbox producer refused a message: %s", exc)
                error: KafkaError = exc.args[0]
                if _is_fatal(error):
                    # Only a fallback: a producer in a fatal state (a broker that came back
                    # empty, say) refuses with _FATAL, and then its flush() raises the fatal
                    # error itself, refusing the whole batch (send_batch). Should it not, the
                    # rows from here on are refused, retried later, and the producer replaced.
                    fatal = refused[row_id] = Refusal(f"not produced: {exc}")
                    continue
                _refuse(refused, held_back, row, error, f"not produced: {exc}", str(exc))
                continue
            produced.append(row)
        unanswered = producer.flush(FLUSH_TIMEOUT_S)
        if unanswered:
            # Messages still queued have no answer yet: none of the rows counts as acknowledged.
            refused.update((row[0], Refusal("no acknowledgement from the broker in time"))
                           for row in produced)
        failed_fatally = fatal is not None
        in_refused_batches: list[tuple[RelayRow, KafkaError]] = []
        for row in produced if self._failed else ():
            err = self._failed.pop(row[6].encode(), None)
            if err is None:
                continue
            if _refuses_the_record(err) and not unanswered:
                in_refused_batches.append((row, err))
                continue
            refused[row[0]] = Refusal(f"{err.name()}: {err.str()}", answered=_answered(err))
            failed_fatally = failed_fatally or _is_fatal(err)
        producer_spent = False
        if in_refused_batches:
            alone, producer_spent = self._send_each_alone(in_refused_batches, deadline)
            refused.update(alone)
        if failed_fatally or producer_spent or (produced and all(row[0] in refused
                                                                 for row in produced)):
            # A producer that had nothing acknowledged may be stuck on state the broker no longer
            # has (a broker that came back empty leaves an idempotent producer waiting on the
            # sequence numbers of partitions it lost): start the next batch with a fresh one.
            # (So too one spent sending rows alone: _send_each_alone.)
            self.close()
        return refused

    def _fresh_producer(self) -> Producer:
        """A fresh producer in place of the current one, which is closed (close())."""
        self.close()
        return self._get_producer()

    def _send_each_alone(self, rows: list[tuple[RelayRow, KafkaError]],
                         deadline: float) -> tuple[dict[int, Refusal], bool]:
        """Send `rows` again one at a time, in order, until `deadline`: the rows of record batches
        the broker refused for a record in them, each with that refusal (_RECORD_REFUSED_FOR_GOOD:
        over the topic's max.message.bytes, or failing the broker's validation). The broker
        refuses such a batch whole, and librdkafka fails every message of it alike, neither
        splitting nor retrying it, so which of them is to blame is learnt by sending each alone.
        One refused alone so is parked, and holds back the rows after it with its topic and key
        (those of its key that were in batches the broker took have gone already); the others go.

        Each goes on a producer the broker has refused nothing since it was made: a fresh one
        before the first, and again after each refused (_FreshProducers, at most
        FRESH_PRODUCERS_ALONE in all, each one replaced closed). An idempotent producer whose
        message the broker refused bumps its epoch, and Tansu answers every message of the bumped
        epoch PRODUCER_FENCED: on the same producer, every row sent alone was refused so, the one
        to blame never found and never parked, and the batch refused whole at every try, for
        ever, its keys with it. (Apache Kafka takes the bumped epoch; a fresh producer there costs
        an InitProducerId round trip.)

        Returns the rows refused, and whether the producer is spent: refused a message since it
        was made, failed fatally, or left a message without an answer (to be replaced)."""
        refused: dict[int, Refusal] = {}
        held_back: dict[tuple[str, str], Refusal] = {}
        fresh = _FreshProducers(self._fresh_producer)
        sound = True
        for row, batch_error in rows:
            row_id, topic, key = row[:3]
            refusal = held_back.get((topic, key))
            # (Rows not sent alone were answered all the same: their record batch was refused.)
            in_batch = f"in a record batch refused as {batch_error.name()}"
            if refusal is None and not sound:
                refusal = Refusal(f"{in_batch}; not sent alone: the producer left a message"
                                  " unanswered and is replaced", answered=True)
            elif refusal is None and deadline - time.monotonic() < ALONE_NEEDS_S:
                refusal = Refusal(f"{in_batch}; not sent alone in time", answered=True)
            elif refusal is None and fresh.used_up:
                refusal = Refusal(f"{in_batch}; not sent alone: {FRESH_PRODUCERS_ALONE} fresh"
                                  " producers used for this batch's rows sent alone", answered=True)
            if refusal:
                refused[row_id] = refusal
                continue
            producer = fresh.producer()
            try:
                self._produce(producer, row)
            except KafkaException as exc:
                err: KafkaError | None = exc.args[0]  # (never sent: the producer is not spent)
            else:
                if producer.flush(deadline - time.monotonic()):
                    refused[row_id] = Refusal("no acknowledgement from the broker in time")
                    sound = False
                    continue
                err = self._failed.pop(row[6].encode(), None)
                if err is not None:
                    fresh.spent()
            if err is None:
                continue  # taken
            why = f"{err.name()}: {err.str()}"  # (the rows held back name it too)
            _refuse(refused, held_back, row, err, why, why)
            sound = sound and not _is_fatal(err)
        return refused, fresh.is_spent or not sound

    @staticmethod
    def _produce(producer: Producer, row: RelayRow) -> None:
        _row_id, topic, key, message_id, event_type, request_id, envelope = row
        headers = relay_headers(message_id, event_type, request_id)
        # confluent-kafka encodes str keys, values and header values as UTF-8 itself.
        while True:
            try:
                producer.produce(topic, envelope, key, headers=headers)
                return
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain first


# Why a row naming a topic that is not the shop's is parked (OutboxPublisher), as its last_error:
# both ways out, first, each a whole command however long the topic's name (the topic comes after
# them): `python -m tasks.parked list` shows an error's first 200 characters (its topic stands in
# a column of its own). A row written before its topic's setting was renamed is sent on to the new
# name; a newer release's row, parked by a relay of the release before during a rolling upgrade,
# is handed back as it is once the relays are upgraded (its topic then the shop's, `--to-topic`
# refuses it: tasks/parked.py).
UNKNOWN_TOPIC_ERROR = (UNKNOWN_TOPIC_ERROR_BEGINS + " is unknown. Renamed? python -m tasks.parked"
                       " replay {service} --outbox --to-topic TOPIC ID. Newer release's? After the"
                       " upgrade: python -m tasks.parked replay {service} --outbox ID. (Its topic"
                       " {topic!r}; this relay's, its TOPIC_* settings and OUTBOX_EXTRA_TOPICS:"
                       " {topics})")


class _FreshProducers:
    """The producers OutboxPublisher._send_each_alone sends rows alone on: a fresh one (`fresh`,
    the publisher's, which closes the one it replaces) before the first row sent, and again
    before each row sent after one was refused (spent), FRESH_PRODUCERS_ALONE at most."""

    def __init__(self, fresh: Callable[[], Producer]):
        self._fresh = fresh
        self._current: Producer | None = None
        self._made = 0
        self.is_spent = True  # (the one the batch went on: its record batch was refused)

    @property
    def used_up(self) -> bool:
        """Whether a row is to be sent on a fresh producer and none is left to take."""
        return self.is_spent and self._made >= FRESH_PRODUCERS_ALONE

    def producer(self) -> Producer:
        if self.is_spent:
            self._current, self.is_spent = self._fresh(), False
            self._made += 1
        return self._current

    def spent(self) -> None:
        """The broker refused a message sent on the current producer."""
        self.is_spent = True


def _refuse_for_good(refused: dict[int, Refusal], held_back: dict[tuple[str, str], Refusal],
                     row: RelayRow, why: str) -> None:
    """Note `row` parked, never produced, for `why`, and hold back the rows after it with its
    topic and key (a row without a key holds nothing back)."""
    row_id, topic, key = row[:3]
    refused[row_id] = Refusal(why, held=True, park=True)
    if key is not None:
        held_back[(topic, key)] = Refusal(f"held back behind a parked message: {why}", held=True)


def _refuse(refused: dict[int, Refusal], held_back: dict[tuple[str, str], Refusal],
            row: RelayRow, error: KafkaError, why: str, detail: str) -> None:
    """Note `row` refused for `error` (parked if the message itself can never go:
    _RECORD_REFUSED_FOR_GOOD), and hold back the rows after it with its topic and key, which must
    not overtake it (a row without a key has no order to keep)."""
    row_id, topic, key = row[:3]
    never = _refuses_the_record(error)
    refused[row_id] = Refusal(why, held=never, park=never, answered=_answered(error))
    if key is not None:  # (answered, as the row it waits behind: for the leader's count)
        held_back[(topic, key)] = Refusal(f"held back behind a refused message: {detail}",
                                          held=never, answered=_answered(error))


def _refuses_the_record(error: KafkaError) -> bool:
    """Whether `error` refuses a message for its own record, the same answer every time it is
    sent as it is (_RECORD_REFUSED_FOR_GOOD)."""
    return error.code() in _RECORD_REFUSED_FOR_GOOD


# The answers that refuse a message for what its own record is, and will refuse it the same way
# every time it is sent as it is: it is parked (for an operator to mend, replay or discard) rather
# than tried again for ever, holding back its key. The broker refuses the whole record batch the
# record came in (every message of it fails alike: OutboxPublisher._send_each_alone finds the
# one to blame). Kept to answers about the record alone: one about the broker's state, its
# clock, the topic's settings or the producer, however it ends, is retried.
_RECORD_REFUSED_FOR_GOOD = frozenset({
    # Over the producer's `message.max.bytes` (refused by produce()) or the topic's
    # `max.message.bytes` (by the broker).
    KafkaError.MSG_SIZE_TOO_LARGE,
    # The broker's validation of the record failed (Kafka 2.4 and later, KIP-467): a record
    # without a key for a compacted topic, one a broker-side schema validation refuses (Tansu's
    # schema registry answers so), a malformed record. Not retriable in Kafka's own client, nor
    # retried by librdkafka (which fails the batch at once, as checked against its mock cluster).
    KafkaError.INVALID_RECORD,
    # Left out, though the broker answers them about records too:
    # - CORRUPT_MESSAGE (librdkafka's INVALID_MSG): a record batch failing its CRC check, which a
    #   batch damaged on its way causes once; retriable in Kafka's client, and librdkafka retries
    #   it itself (against its mock cluster the batch went at the retry). Brokers before 2.4
    #   answered a keyless record for a compacted topic so too (since, INVALID_RECORD): there,
    #   such a row is still retried for ever.
    # - INVALID_TIMESTAMP: a timestamp outside the topic's message.timestamp.*.max.ms of the
    #   broker's clock; the relay's records are stamped by librdkafka as they are produced, so
    #   this is the clocks' skew, mended with them.
    # - UNSUPPORTED_FOR_MESSAGE_FORMAT, UNSUPPORTED_COMPRESSION_TYPE, RECORD_LIST_TOO_LARGE: the
    #   topic's or the broker's settings against the producer's record batches, every row alike.
})


def _answered(error: KafkaError) -> bool:
    """Whether `error` is the broker's answer about the message or its topic, which says that the
    producer reaches the broker: one of the broker's own error codes (librdkafka's "Broker: ..."
    errors, UNKNOWN and up: an authorization it refused, an invalid topic or record, a record too
    large), or librdkafka's own word, from the broker's metadata, that the topic or partition does
    not exist (_UNKNOWN_TOPIC, _UNKNOWN_PARTITION). librdkafka's other errors, all below UNKNOWN
    ("Local: ..."), are its own: a message with no answer in time (_MSG_TIMED_OUT), a broken or
    refused connection (_TRANSPORT, _ALL_BROKERS_DOWN, _RESOLVE), a producer in a fatal state.
    (The broker's answers that a partition's leader is out of reach, NOT_LEADER_OR_FOLLOWER,
    LEADER_NOT_AVAILABLE, NOT_ENOUGH_REPLICAS, REQUEST_TIMED_OUT, librdkafka retries until the
    message times out: they come as _MSG_TIMED_OUT, with no answer.)"""
    code = error.code()
    return code >= KafkaError.UNKNOWN or code in _NO_SUCH_TOPIC_OR_PARTITION


_NO_SUCH_TOPIC_OR_PARTITION = frozenset({KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION})


def _fatal_error_raised_by(exc: BaseException) -> KafkaError | None:
    """The producer's fatal error, if `exc` is confluent-kafka's KafkaException for it or was
    raised because of it: once it has set the exception, a flush() still calls the delivery
    callback for the messages that failed with it, whose every call then fails with a
    SystemError, raised in its place (its cause, the KafkaException)."""
    for raised in _raised_from(exc):
        error = raised.args[0] if isinstance(raised, KafkaException) and raised.args else None
        if isinstance(error, KafkaError) and _is_fatal(error):
            return error
    return None


def _let_go_of_frames(exc: BaseException) -> None:
    """Drop the tracebacks of `exc` and of the exceptions it was raised from. confluent-kafka
    keeps a reference to the exceptions a fatal error raises from flush() for ever, and through
    their tracebacks the frames they passed, which hold the producer: every producer replaced
    after a fatal error would live on, its threads and connection with it."""
    for raised in _raised_from(exc):
        raised.__traceback__ = None


def _raised_from(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then the exception it was raised from (its cause), and so on. Not its context: an
    exception raised while a fatal error was being handled (a bug in the handling) was not raised
    because of it, and must escape rather than count as the fatal error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _is_fatal(error: KafkaError) -> bool:
    # A producer in a fatal state answers with the code _FATAL; fatal() is set only on the error
    # confluent-kafka raises from flush() or poll() (_fatal_error_raised_by) and the
    # transactional API's.
    return error.fatal() or error.code() == KafkaError._FATAL


def _noting_failures_in(failed: dict[bytes, KafkaError]):
    """The producer's delivery callback: note each failed message, by its value, in `failed`. (A
    closure over the dict rather than a method, so that the producer does not keep its publisher
    alive: a publisher let go takes its producer and connections with it at once.)"""

    def delivery_failed(err: KafkaError, msg) -> None:
        failed[msg.value()] = err

    return delivery_failed
