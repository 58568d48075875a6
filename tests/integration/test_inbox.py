"""The inbox against real PostgreSQL: storing once, handling once, parking what cannot be
handled."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg2
import pytest
import sqlalchemy as sa
from marshmallow import fields, validate
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared import contracts
from shared.contracts import (FAILURE_REASONS, PAYLOAD_SCHEMAS, PAYMENT_FAILED, PAYMENT_REQUESTED,
                              ContractSchema, PaymentFailedSchema, encode, new_event)
from shared.db import (TransactionAborted, after_commit, db, driver_cursor, driver_dsn,
                       held_up_by_a_lock, refuse_if_aborted, transaction)
from shared.fields import Amount
from shared.inbox.handling import (Handler, Outcome, PermanentMessageError, ReceivedEvent,
                                   handle_locked_message, handle_locked_messages_at_once,
                                   lock_in_order, lock_in_order_marking_processed,
                                   note_try_begun, process_inbox_message, record_failed_attempt)
from shared.inbox.model import InboxMessage
from shared.inbox.parked import discard_parked_messages, unpark_messages
from shared.inbox import taken_ids
from shared.inbox.storing import ConsumedRecord, inbox_row, insert_records
from shared.inbox.sweeping import claim_stalled_messages
from shared.request_context import REQUEST_ID_KAFKA_HEADER, RequestIdLogFilter
from tasks.services import service_app
from tests.clock_tools import inbox_clock_off_by
from tests.postgres_tools import terminate_backend, wait_for_sessions_waiting_on_a_lock
from tests.thread_tools import OutcomeThread, all_joined

_offsets = iter(range(10**9))


def _record(value: bytes, headers: dict | None = None) -> ConsumedRecord:
    return ConsumedRecord("test-topic", 0, next(_offsets), b"k", value, headers or {})


def _request_record(user_id: str, message_id: uuid.UUID | None = None,
                    request_id: str | None = None,
                    failed: bool = False) -> tuple[ConsumedRecord, uuid.UUID]:
    """A PaymentRequested record (a PaymentFailed one if `failed`) of `user_id`."""
    payload = {"order_id": uuid.uuid4(), "user_id": user_id, "amount": Decimal("1.00")}
    event = (new_event(PAYMENT_FAILED, payload | {"reason": FAILURE_REASONS[0]}) if failed
             else new_event(PAYMENT_REQUESTED, payload))
    body = event.to_json()
    if message_id is not None:
        body["message_id"] = str(message_id)
    headers = {"message_id": body["message_id"].encode()}
    if request_id is not None:
        headers[REQUEST_ID_KAFKA_HEADER] = request_id.encode()
    record = _record(encode(body), headers)
    return record, uuid.UUID(body["message_id"])


def _serialised_again(record: ConsumedRecord) -> ConsumedRecord:
    """The record's message serialised again, as a producer other than its relay might (other
    bytes: its keys in another order, spaced otherwise), at another offset."""
    body = json.loads(record.value)
    return _record(json.dumps(dict(reversed(body.items())), indent=1).encode(), record.headers)


def _row(message_id) -> InboxMessage:
    db.session.rollback()
    return db.session.get(InboxMessage, message_id)


def _stored_at(*records: ConsumedRecord) -> list[InboxMessage]:
    """The inbox rows of the records at these records' offsets (a record parked under an id of
    its own keeps its offset)."""
    db.session.rollback()
    return db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == "test-topic",
        InboxMessage.offset.in_([record.offset for record in records]))).all()


def test_a_message_delivered_twice_is_stored_once_with_its_values_digest(
        in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    assert payments_inbox([record, record]) == [message_id]
    assert payments_inbox([record]) == []
    assert _row(message_id).value_digest == hashlib.sha256(record.value).digest()


def test_a_message_delivered_again_while_a_handler_marks_it_is_passed_over_without_waiting(
        in_payments, payments_inbox, user_id):
    """A repeat (a rebalance, a relay's resend) of a message a handler's transaction has marked
    processed and not yet committed: storing the batch does not wait for that transaction (up to
    lock_timeout, then failing the whole batch, again and again until it committed)."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    new_record, new_id = _request_record(user_id)
    with transaction() as handling:
        handling.execute(text("UPDATE inbox_messages SET processed_at = now()"
                              " WHERE message_id = :id"), {"id": message_id})
        # (Waiting, it would fail at lock_timeout, the row held until the block ends.)
        assert payments_inbox([record, new_record]) == [new_id]


def test_an_unparseable_message_is_parked_at_once_and_not_dispatched(in_payments, payments_inbox):
    record = _record(b"{not json")
    assert payments_inbox([record]) == []
    row = db.session.scalars(select(InboxMessage).where(InboxMessage.offset == record.offset,
                                                        InboxMessage.topic == "test-topic")).one()
    assert row.parked_at is not None
    assert row.raw_value == "{not json"
    assert "not UTF-8 JSON" in row.last_error


def test_a_message_is_handled_once_however_often_it_is_dispatched(in_payments, payments_inbox,
                                                                 user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    calls = []
    handlers = {PAYMENT_REQUESTED: lambda session, events: calls.extend(e.payload for e in events)}
    outcomes = []
    for _ in range(3):
        with transaction() as session:
            outcomes.append(process_inbox_message(session, message_id, handlers))
    assert outcomes == [Outcome.PROCESSED, Outcome.ALREADY_DONE, Outcome.ALREADY_DONE]
    assert len(calls) == 1 and calls[0]["amount"] == Decimal("1.00")
    assert _row(message_id).processed_at is not None


def test_a_failing_handler_leaves_no_effect_and_the_message_is_parked_after_the_last_attempt(
        in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])

    def failing(session, events):
        raise RuntimeError("downstream broken")

    parked = []
    for _ in range(3):
        with pytest.raises(RuntimeError):
            with transaction() as session:
                process_inbox_message(session, message_id, {PAYMENT_REQUESTED: failing})
        with transaction() as session:
            parked.append(record_failed_attempt(session, message_id, "downstream broken", 3))
    assert parked == [None, None, Outcome.PARKED]
    row = _row(message_id)
    assert row.attempts == 3 and row.parked_at is not None and row.processed_at is None
    assert row.last_error == "downstream broken"


def test_a_permanent_error_parks_the_message_without_retrying(in_payments, payments_inbox,
                                                               user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])

    def refuses(session, events):
        raise PermanentMessageError("unknown order")

    with transaction() as session:
        outcome = process_inbox_message(session, message_id, {PAYMENT_REQUESTED: refuses})
        assert outcome == Outcome.PARKED
    row = _row(message_id)
    assert row.parked_at is not None and row.last_error == "unknown order"


def test_messages_waiting_too_long_are_claimed_by_the_sweeper_once_per_wait(
        in_payments, payments_inbox, user_id):
    """A stalled message is handed back once, and again only if it stalls again for as long:
    however many wait, a sweep does not hand back what the last one did (thousands, after Redis
    was down a while, would otherwise go out again on every sweep until handled)."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with transaction() as session:
        assert message_id not in _claimed(session, timedelta(minutes=5))
        assert message_id in _claimed(session, timedelta(seconds=-1))
    with transaction() as session:
        assert message_id not in _claimed(session, timedelta(seconds=1))
        assert message_id in _claimed(session, timedelta(seconds=-1))


def _claimed(session, min_age: timedelta, max_attempts: int | None = 5) -> dict:
    """What a sweep hands over: each message's id, and its tries so far."""
    return {stalled.message_id: stalled.attempts
            for stalled in claim_stalled_messages(session, min_age, max_attempts)}


def _try_begun(message_id) -> datetime | None:
    """What a task of the message's own does as it begins (and then, here, its worker dies): when
    its try began, as noted, or None."""
    with transaction() as session:
        begun = note_try_begun(session, message_id)
    return begun.at if begun else None


def test_a_message_whose_tries_come_to_nothing_as_often_as_it_may_be_tried_is_parked(
        in_payments, payments_inbox, user_id):
    """Handling that crashes its worker records no failure: a try that began after the last
    handing over, and never ended, counts as one, so that such a message is parked at the limit
    rather than handed over, and crash a worker, every sweep for ever. Its last recorded error is
    kept."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with transaction() as session:
        record_failed_attempt(session, message_id, "ConnectionError('ledger')", max_attempts=5)
        assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == 1
    for tries in (2, 3):
        _try_begun(message_id)
        with transaction() as session:
            assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == tries
    _try_begun(message_id)
    with transaction() as session:
        assert message_id not in _claimed(session, timedelta(seconds=-1), max_attempts=4)
    row = _row(message_id)
    assert row.attempts == 4 and row.parked_at is not None and row.processed_at is None
    assert row.last_error == ("tried 4 times and never handled: its handling may crash or hang"
                              " the worker (its tries were lost with it); last error:"
                              " ConnectionError('ledger')")
    with transaction() as session:
        assert message_id not in _claimed(session, timedelta(seconds=-1))


def test_a_handing_over_no_try_took_up_counts_no_attempt(in_payments, payments_inbox, user_id):
    """Its task may wait in a busy worker's memory, taken from the queue ahead of its turn, or
    have been lost with a worker that crashed for another message's sake: no fault of its own."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    for _ in range(6):
        with transaction() as session:
            assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == 0
    assert _row(message_id).parked_at is None


def test_a_handing_over_made_while_tasks_wait_counts_no_attempt(in_payments, payments_inbox,
                                                               user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    _try_begun(message_id)
    for _ in range(6):
        with transaction() as session:
            assert _claimed(session, timedelta(seconds=-1), max_attempts=None)[message_id] == 0
    assert _row(message_id).parked_at is None
    with transaction() as session:  # (the open try is counted by the next sweep with no backlog)
        assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == 1
        assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == 1


def test_a_try_that_recorded_its_failure_is_not_counted_again(in_payments, payments_inbox,
                                                              user_id):
    """A try that failed, counted as it failed, or held up by another session's lock and so not
    counted, has ended: handed over again (its retry lost with its worker, say), it counts
    nothing more."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    for counted, attempts in ((True, 1), (False, 1)):
        try_began_at = _try_begun(message_id)
        with transaction() as session:
            assert record_failed_attempt(session, message_id, "OperationalError('lock timeout')",
                                         max_attempts=4, counted=counted,
                                         try_began_at=try_began_at) is None
        with transaction() as session:
            assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == attempts


def test_a_failed_try_the_sweeper_took_for_lost_meanwhile_is_counted_once_and_left_to_it(
        in_payments, payments_inbox, user_id):
    """A try that ran past the sweep's minimum age and failed: between its rollback and the
    record of its failure, a sweep can find it open, count it as lost and hand the message over
    again. The record then counts it no more (else the message is parked after half its tries),
    keeps its error, and leaves the message to that handing over (a retry of the task's own
    would hand it out twice)."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    try_began_at = _try_begun(message_id)
    assert try_began_at == _row(message_id).last_attempt_at

    def failing(session, events):
        raise RuntimeError("statement timeout")

    with pytest.raises(RuntimeError):
        with transaction() as session:
            process_inbox_message(session, message_id, {PAYMENT_REQUESTED: failing})
    with transaction() as session:
        assert _claimed(session, timedelta(seconds=-1), max_attempts=4)[message_id] == 1
    with transaction() as session:
        assert record_failed_attempt(session, message_id, "RuntimeError('statement timeout')",
                                     max_attempts=4,
                                     try_began_at=try_began_at) == Outcome.HANDED_OVER
    row = _row(message_id)
    assert row.attempts == 1 and not row.try_open and row.parked_at is None
    assert row.last_error == "RuntimeError('statement timeout')"


def test_a_failed_try_a_batch_counted_its_own_of_meanwhile_is_left_to_the_batch(
        in_payments, payments_inbox, settings, user_id):
    """Between a task's failed try and its record, a batch handling the message one by one fails
    it too, counts its own try (closing the task's) and hands the message to a task of its own:
    the first task's record keeps its error, counts nothing and leaves the message to the batch's
    (else two tasks would go on retrying it)."""
    from tasks.inbox import _handle_in_one_transaction

    record, message_id = _request_record(user_id)
    payments_inbox([record])
    try_began_at = _try_begun(message_id)
    with pytest.raises(RuntimeError):
        with transaction() as session:
            process_inbox_message(session, message_id, {PAYMENT_REQUESTED: _failing})
    assert _handle_in_one_transaction("payments", [message_id],
                                      {PAYMENT_REQUESTED: _failing}) == [message_id]
    with transaction() as session:
        assert record_failed_attempt(session, message_id, "RuntimeError('the task's own')",
                                     settings.inbox_max_attempts,
                                     try_began_at=try_began_at) == Outcome.HANDED_OVER
    row = _row(message_id)
    assert row.attempts == 1 and not row.try_open and row.parked_at is None
    assert row.last_error == "RuntimeError('the task's own')"


def test_a_failed_try_the_sweeper_parked_for_meanwhile_adds_its_error_to_the_parked_one(
        in_payments, payments_inbox, user_id):
    """As above, the lost try the sweep counts being the message's last: the sweep parks it, and
    the record adds the try's own error to what the sweep parked it with (its real cause, for the
    operator), and tells the task not to retry it."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    try_began_at = _try_begun(message_id)
    with transaction() as session:
        assert message_id not in _claimed(session, timedelta(seconds=-1), max_attempts=1)
    with transaction() as session:
        assert record_failed_attempt(session, message_id, "RuntimeError('statement timeout')",
                                     max_attempts=1,
                                     try_began_at=try_began_at) == Outcome.PARKED
    row = _row(message_id)
    assert row.attempts == 1 and row.parked_at is not None
    assert row.last_error.startswith("tried 1 times and never handled")
    assert row.last_error.endswith("; last try: RuntimeError('statement timeout')")


@pytest.mark.parametrize("counted", [False, True], ids=["held up by a lock", "failed"])
def test_a_failed_try_not_noted_as_begun_finds_the_message_parked_meanwhile_and_leaves_it(
        in_payments, payments_inbox, user_id, counted):
    """A task whose try was not noted as begun (another's try held the row, which note_try_begun
    passes over) fails (its wait for that row ran out, say), and the other's try, the message's
    last attempt, parks it meanwhile: the record tells the task the message is parked (a retry
    would only find it so), and leaves the park's error as it is (a try not noted may never have
    reached the handler, nor can it tell whether the message was parked before it began)."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(attempts=4))
    with transaction() as others:
        (message,) = lock_in_order(others, [message_id])
        with db.engine.connect() as connection, Session(bind=connection) as beginning:
            assert note_try_begun(beginning, message_id) is None
            beginning.commit()
        assert handle_locked_message(others, message, {PAYMENT_REQUESTED: _failing},
                                     5) == Outcome.PARKED
    with transaction() as session:
        assert record_failed_attempt(session, message_id, "OperationalError('lock timeout')",
                                     max_attempts=5, counted=counted) == Outcome.PARKED
    row = _row(message_id)
    assert row.attempts == 5 and row.parked_at is not None
    assert row.last_error == "RuntimeError('downstream broken')"


def test_a_failed_try_that_finds_its_message_handled_meanwhile_is_told_it_is_done(
        in_payments, payments_inbox, user_id):
    """A try's failure recorded after the message was handled (by another task of it, or by the
    try itself, its COMMIT's answer lost): the record says it is done, so that the task does not
    retry it only to find it so, and leaves the row as it is."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(processed_at=sa.func.clock_timestamp()))
    before = _row(message_id)
    with transaction() as session:
        assert record_failed_attempt(session, message_id, "OperationalError('server closed')",
                                     max_attempts=5) == Outcome.ALREADY_DONE
    after = _row(message_id)
    assert (after.attempts, after.last_error, after.processed_at) == (
        before.attempts, before.last_error, before.processed_at)


def test_a_try_held_up_by_a_lock_keeps_the_error_of_the_last_try_that_failed(
        in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    for error, counted in (("ValueError('the real cause')", True),
                           ("OperationalError('lock timeout')", False)):
        with transaction() as session:
            record_failed_attempt(session, message_id, error, max_attempts=4, counted=counted)
    assert _row(message_id).last_error == "ValueError('the real cause')"


def test_one_message_handed_to_two_tasks_at_once_is_handled_once(settings, payments_inbox,
                                                                 user_id):
    """The sweeper, a replay or a prefetched retry can hand a message over twice: its row lock
    makes the second wait and then find it handled."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])

    def handle(handlers):
        with transaction() as session:
            return process_inbox_message(session, message_id, handlers)

    calls, outcomes = _handled_by_two_at_once(handle, settings.database_url("payments"))
    assert calls == [message_id]
    assert sorted(outcome.value for outcome in outcomes) == ["already_done", "processed"]


def _handled_by_two_at_once(handle: Callable[[dict], object],
                            database_url: str) -> tuple[list, list]:
    """The message ids a payment-requested handler was called with, and what `handle` (given the
    handlers) returned in each of two threads running it at once in the payments app (of
    `database_url`): the first call holds on until the other thread waits on a lock (the row's),
    and the second is to find the message handled. Either thread raising fails the test."""
    calls = []

    def held_until_the_other_waits(session, events):
        calls.append(events[0].message.message_id)
        if len(calls) == 1:
            wait_for_sessions_waiting_on_a_lock(database_url, timeout=10,
                                                what="the other thread waiting on the row")

    def run():
        with service_app("payments").app_context():
            return handle({PAYMENT_REQUESTED: held_until_the_other_waits})

    threads = [OutcomeThread(run) for _ in range(2)]
    for thread in threads:
        thread.start()
    return calls, all_joined(threads, 30)


@contextmanager
def _held_by_a_handler(message_id) -> Iterator[Session]:
    """A session of its own, while a handler's transaction holds the message's row."""
    with transaction() as handling:
        handling.execute(text("SELECT 1 FROM inbox_messages WHERE message_id = :id FOR UPDATE"),
                         {"id": message_id})
        with db.engine.connect() as other, Session(bind=other) as session:
            yield session


def test_a_try_begins_only_of_a_message_still_waiting_and_no_handler_holds(
        in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with _held_by_a_handler(message_id) as beginning:
        assert note_try_begun(beginning, message_id) is None  # (not waiting for the lock)
        beginning.commit()
    assert not _row(message_id).try_open
    assert _try_begun(message_id) is not None
    assert _row(message_id).try_open
    with transaction() as session:
        process_inbox_message(session, message_id, {PAYMENT_REQUESTED: lambda *_: None})
    row = _row(message_id)
    assert row.processed_at is not None
    assert _try_begun(message_id) is None  # (a late task of a message handled meanwhile)
    assert _row(message_id).last_attempt_at == row.last_attempt_at


def _failing(session, events):
    raise RuntimeError("downstream broken")


def _refusing(session, events):
    raise PermanentMessageError("unknown order")


def test_a_try_that_handles_its_message_closes_itself(in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    _try_begun(message_id)
    with transaction() as session:
        assert process_inbox_message(session, message_id,
                                     {PAYMENT_REQUESTED: lambda *_: None}) == Outcome.PROCESSED
    row = _row(message_id)
    assert row.processed_at is not None and not row.try_open


@pytest.mark.parametrize("handlers", [{PAYMENT_REQUESTED: _refusing}, {}],
                         ids=["a permanent error", "no handler"])
def test_a_try_that_parks_its_message_closes_itself(in_payments, payments_inbox, user_id,
                                                    handlers):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    _try_begun(message_id)
    with transaction() as session:
        assert process_inbox_message(session, message_id, handlers) == Outcome.PARKED
    row = _row(message_id)
    assert row.parked_at is not None and not row.try_open


@pytest.mark.parametrize("max_attempts", [1, 5], ids=["its last attempt", "one of five"])
def test_a_failed_try_counted_where_it_failed_closes_itself(in_payments, payments_inbox, user_id,
                                                            max_attempts):
    """As a batch handling its messages one by one counts a failure, and parks the message when it
    used its last attempt."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    _try_begun(message_id)
    with transaction() as session:
        (message,) = lock_in_order(session, [message_id])
        try:
            outcome = handle_locked_message(session, message, {PAYMENT_REQUESTED: _failing},
                                            max_attempts)
        except RuntimeError:
            outcome = None  # (counted, and left to a retry)
    assert outcome == (Outcome.PARKED if max_attempts == 1 else None)
    row = _row(message_id)
    assert row.attempts == 1 and not row.try_open
    assert (row.parked_at is not None) == (max_attempts == 1)


def test_the_times_a_try_writes_are_the_databases_clock_though_the_workers_runs_behind(
        in_payments, payments_inbox, user_id):
    """The sweeper measures a message's wait from its `received_at`, the database's clock, to its
    `last_attempt_at`, by the database's clock: whatever marks a message writes its times by
    that clock too (clock_timestamp()), not by the worker's, an hour behind here."""
    records, message_ids = zip(*(_request_record(user_id) for _ in range(6)))
    payments_inbox(list(records))
    handled, counted, parked, batched, discarded, begun = message_ids
    with transaction() as session:
        before = session.scalar(text("SELECT clock_timestamp()"))
    with inbox_clock_off_by(-timedelta(hours=1)):
        with transaction() as session:
            process_inbox_message(session, handled, {PAYMENT_REQUESTED: lambda *_: None})
        with transaction() as session:
            (message,) = lock_in_order(session, [counted])
            handle_locked_message(session, message, {PAYMENT_REQUESTED: _failing}, 1)
        for message_id in (parked, discarded):
            with transaction() as session:
                process_inbox_message(session, message_id, {PAYMENT_REQUESTED: _refusing})
        with transaction() as session:
            handle_locked_messages_at_once(
                session, lock_in_order_marking_processed(session, [batched]), {})
        _try_begun(begun)
        with transaction() as session:
            unpark_messages(session, [parked])
            discard_parked_messages(session, [discarded])
    times = {
        "processed": (_row(handled).processed_at, _row(handled).last_attempt_at),
        "counted and parked": (_row(counted).parked_at, _row(counted).last_attempt_at),
        "parked in a batch": (_row(batched).parked_at, _row(batched).last_attempt_at),
        "replayed": (_row(parked).last_attempt_at,),
        "discarded": (_row(discarded).processed_at,),
        "begun": (_row(begun).last_attempt_at,)}
    assert {what: all(time >= before for time in written)
            for what, written in times.items()} == dict.fromkeys(times, True), (before, times)


def test_a_record_parked_as_it_is_stored_is_parked_at_the_databases_clock(in_payments,
                                                                          payments_inbox):
    """`list` orders parked messages by `parked_at`, and `replay --all` and `discard --all` stop
    at the last one listed: a record the consumer parks as it stores it (one that cannot be
    read) is parked at the database's clock, as a handler parks, not at the consumer's, an hour
    behind here."""
    unreadable = _record(b"not a message")
    with transaction() as session:
        before = session.scalar(text("SELECT clock_timestamp()"))
    with inbox_clock_off_by(-timedelta(hours=1)):
        payments_inbox([unreadable])
    with transaction() as session:
        parked_at = session.scalar(
            select(InboxMessage.parked_at).where(InboxMessage.topic == unreadable.topic,
                                                 InboxMessage.offset == unreadable.offset))
    assert parked_at is not None and parked_at >= before, (before, parked_at)


@pytest.mark.parametrize("failure", [_failing, _refusing], ids=["counted", "parked"])
def test_what_a_failed_try_asked_to_do_after_the_commit_is_not_done(in_payments, payments_inbox,
                                                                    user_id, failure):
    """Its savepoint rolled back, a failed try's after_commit callbacks go with its writes, though
    the transaction commits its count or its parking; those registered before it still run."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    done = []

    def asks_then_fails(session, events):
        after_commit(session, lambda: done.append("the failed try's"))
        failure(session, events)

    with transaction() as session:
        after_commit(session, lambda: done.append("the transaction's own"))
        (message,) = lock_in_order(session, [message_id])
        with suppress(RuntimeError):
            handle_locked_message(session, message, {PAYMENT_REQUESTED: asks_then_fails}, 5)
    assert done == ["the transaction's own"]
    row = _row(message_id)
    assert row.attempts == 1 and (row.parked_at is not None) == (failure is _refusing)


def _refused_at_commit(session, events):
    """Writes what PostgreSQL refuses only as the transaction commits: a value twice under a
    unique constraint checked at the end of the transaction (a temporary table's, gone with it)."""
    with driver_cursor(session) as cursor:
        cursor.execute("CREATE TEMP TABLE checked_at_commit"
                       " (value int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP;"
                       " INSERT INTO checked_at_commit VALUES (1), (1)")


def _handled_one_by_one_in(session, message_id, handlers) -> None:
    assert process_inbox_message(session, message_id, handlers) == Outcome.PROCESSED


def _handled_at_once_in(session, message_id, handlers) -> None:
    handle_locked_messages_at_once(
        session, lock_in_order_marking_processed(session, [message_id]), handlers)


@contextmanager
def _handled_lines(caplog, *message_ids) -> Iterator[Callable[[], list[tuple[uuid.UUID, str]]]]:
    """What has been said handled of the messages so far: each line's message and request id."""
    caplog.set_level(logging.INFO, logger="shared.inbox.handling")
    caplog.handler.addFilter(RequestIdLogFilter())
    saying = {f"handled {type} {message_id}": message_id
              for message_id in message_ids for type in (PAYMENT_REQUESTED, PAYMENT_FAILED)}
    yield lambda: [(saying[entry.getMessage()], entry.request_id) for entry in caplog.records
                   if entry.getMessage() in saying]


@pytest.mark.parametrize("handle", [_handled_one_by_one_in, _handled_at_once_in],
                         ids=["one by one", "at once"])
def test_a_message_is_said_handled_once_its_transaction_has_committed_not_before(
        in_payments, payments_inbox, user_id, caplog, handle):
    """The line saying a message was handled is written once its handling has committed, with the
    message's request id; not when the commit fails (here on a constraint checked at the end of
    the transaction), the handling undone."""
    request_id = f"click-{uuid.uuid4().hex}"
    record, message_id = _request_record(user_id, request_id=request_id)
    payments_inbox([record])
    with _handled_lines(caplog, message_id) as said_handled:
        with pytest.raises(sa.exc.IntegrityError):
            with transaction() as session:
                handle(session, message_id, {PAYMENT_REQUESTED: _refused_at_commit})
        assert said_handled() == [] and _row(message_id).processed_at is None
        with transaction() as session:
            handle(session, message_id, {PAYMENT_REQUESTED: lambda *_: None})
            assert said_handled() == []
        assert said_handled() == [(message_id, request_id)]


def test_a_message_of_a_batch_handled_again_one_by_one_is_said_handled_once(
        in_payments, payments_inbox, user_id, caplog):
    """A batch handled at once rolls back whole when one of its messages fails, and is handled
    again one by one: the messages it handled the first time are said handled once, as that
    second run commits, not once for a handling undone as well."""
    from tasks.inbox import _handle_in_one_transaction

    request_ids = [f"click-{uuid.uuid4().hex}" for _ in range(2)]
    records = [_request_record(user_id, request_id=request_ids[0]),
               _request_record(user_id, request_id=request_ids[1], failed=True)]
    payments_inbox([record for record, _ in records])
    good, failing = (message_id for _, message_id in records)
    handlers = {PAYMENT_REQUESTED: lambda *_: None, PAYMENT_FAILED: _failing}  # (two runs)
    with _handled_lines(caplog, good, failing) as said_handled:
        assert _handle_in_one_transaction("payments", [good, failing], handlers) == [failing]
        assert said_handled() == [(good, request_ids[0])]


class _RolledBack(Exception):
    """Raised in a transaction to roll it back whole."""


def _parked_by_its_handler(session, message_id) -> None:
    assert process_inbox_message(
        session, message_id, {PAYMENT_REQUESTED: _refusing}) == Outcome.PARKED


def _parked_at_its_last_attempt_counted_where_it_failed(session, message_id) -> None:
    (message,) = lock_in_order(session, [message_id])
    assert handle_locked_message(
        session, message, {PAYMENT_REQUESTED: _failing}, max_attempts=1) == Outcome.PARKED


def _parked_at_its_last_attempt_recorded(session, message_id) -> None:
    assert record_failed_attempt(session, message_id, "RuntimeError('downstream broken')",
                                 max_attempts=1) == Outcome.PARKED


def _parked_in_a_batch_handled_at_once(session, message_id) -> None:
    handle_locked_messages_at_once(
        session, lock_in_order_marking_processed(session, [message_id]), {})


def _parked_by_the_sweeper(session, message_id) -> None:
    """Its last try lost with its worker, and counted by the sweeper (a limit of its own, that no
    other test's message, caught by the same sweep, reaches)."""
    session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                    .values(attempts=999, try_open=True,
                            last_attempt_at=sa.func.clock_timestamp()))
    assert message_id not in _claimed(session, timedelta(seconds=-1), max_attempts=1000)


@pytest.mark.parametrize("park", [
    _parked_by_its_handler, _parked_at_its_last_attempt_counted_where_it_failed,
    _parked_at_its_last_attempt_recorded, _parked_in_a_batch_handled_at_once,
    _parked_by_the_sweeper], ids=lambda park: park.__name__.removeprefix("_parked_"))
def test_a_message_is_said_parked_once_its_parking_has_committed_not_before(
        in_payments, payments_inbox, user_id, caplog, park):
    """The ERROR line saying a message was parked is written once the parking has committed, with
    the message's request id, and only then: not for a parking that a rollback undid (a batch
    rolled back whole, to be handled again one by one, a COMMIT that failed), which then said a
    park that never happened, and said it twice once the message was parked after all."""
    request_id = f"click-{uuid.uuid4().hex}"
    record, message_id = _request_record(user_id, request_id=request_id)
    payments_inbox([record])
    for logger in ("shared.inbox.handling", "shared.inbox.sweeping"):
        caplog.set_level(logging.ERROR, logger=logger)
    caplog.handler.addFilter(RequestIdLogFilter())

    def said_parked() -> list[str]:
        return [entry.request_id for entry in caplog.records
                if entry.getMessage().startswith(f"parked inbox message {message_id}")]

    with pytest.raises(_RolledBack):
        with transaction() as session:
            park(session, message_id)
            raise _RolledBack()
    assert said_parked() == [] and _row(message_id).parked_at is None
    with transaction() as session:
        park(session, message_id)
        assert said_parked() == []
    assert said_parked() == [request_id] and _row(message_id).parked_at is not None


def test_a_batch_handling_its_messages_one_by_one_closes_their_open_tries(
        in_payments, payments_inbox, settings, user_id):
    """Its first run fails whole on the permanent error, and the run one message per savepoint
    processes, parks or counts each: all of them end a try."""
    from tasks.inbox import _handle_in_one_transaction

    records = [_request_record(user_id) for _ in range(4)]
    payments_inbox([record for record, _ in records])
    good, refused, last_try, retried = (message_id for _, message_id in records)
    with transaction() as session:
        session.execute(text("UPDATE inbox_messages SET attempts = :attempts"
                             " WHERE message_id = :id"),
                        {"attempts": settings.inbox_max_attempts - 1, "id": last_try})
    for message_id in (good, refused, last_try, retried):
        _try_begun(message_id)
    failures = {refused: _refusing, last_try: _failing, retried: _failing}

    def handle(session, events):
        for event in events:
            failures.get(event.message.message_id, lambda *_: None)(session, [event])

    assert _handle_in_one_transaction("payments", [good, refused, last_try, retried],
                                      {PAYMENT_REQUESTED: handle}) == [retried]
    rows = {message_id: _row(message_id) for message_id in (good, refused, last_try, retried)}
    assert rows[good].processed_at is not None
    assert rows[refused].parked_at is not None and rows[last_try].parked_at is not None
    assert rows[retried].parked_at is None and rows[retried].attempts == 1
    assert [message_id for message_id, row in rows.items() if row.try_open] == []


def test_a_batch_handled_at_once_marks_its_messages_processed_in_the_statement_locking_them(
        in_payments, payments_inbox, user_id):
    """One statement a batch fewer: its handlers, in its transaction, find their messages marked
    already, each try counted once and closed, as the commit leaves them."""
    from tasks.inbox import _handle_in_one_transaction

    records = [_request_record(user_id) for _ in range(3)]
    payments_inbox([record for record, _ in records])
    message_ids = [message_id for _, message_id in records]
    for message_id in message_ids:
        _try_begun(message_id)
    seen_marked = []

    def handle(session, events):
        with driver_cursor(session) as cursor:
            cursor.execute("SELECT count(*) FROM inbox_messages WHERE message_id = ANY(%s::uuid[])"
                           " AND processed_at IS NOT NULL AND attempts = 1 AND NOT try_open",
                           ([str(event.message.message_id) for event in events],))
            seen_marked.append(cursor.fetchone()[0])

    assert _handle_in_one_transaction("payments", message_ids, {PAYMENT_REQUESTED: handle}) == []
    assert seen_marked == [3]
    for row in map(_row, message_ids):
        assert row.processed_at is not None and row.processed_at == row.last_attempt_at
        assert row.attempts == 1 and not row.try_open and row.parked_at is None


def _handled_one_at_a_time(message_id, handlers) -> None:
    with transaction() as session:
        assert process_inbox_message(session, message_id, handlers) == Outcome.PROCESSED


def _handled_in_a_batch_at_once(message_id, handlers) -> None:
    from tasks.inbox import _handle_in_one_transaction

    assert _handle_in_one_transaction("payments", [message_id], handlers) == []


@pytest.mark.parametrize("handled", [_handled_one_at_a_time, _handled_in_a_batch_at_once],
                         ids=["one at a time", "in a batch at once"])
def test_a_message_handled_after_a_failed_try_is_marked_alike_whichever_way_it_is_handled(
        in_payments, payments_inbox, user_id, handled):
    """Both statements that mark a message processed (_MARK_PROCESSED, a message at a time, and
    the batch's locking one) leave its row alike: this try counted on top of the failed one and
    closed, the failed one's error cleared, processed as of this try."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    _try_begun(message_id)
    with transaction() as session:
        (message,) = lock_in_order(session, [message_id])
        with pytest.raises(RuntimeError):
            handle_locked_message(session, message, {PAYMENT_REQUESTED: _failing}, 5)
    _try_begun(message_id)
    handled(message_id, {PAYMENT_REQUESTED: lambda *_: None})
    row = _row(message_id)
    assert (row.attempts, row.try_open, row.last_error, row.parked_at) == (2, False, None, None)
    assert row.processed_at is not None and row.processed_at == row.last_attempt_at


def test_a_message_a_batch_handled_at_once_cannot_handle_is_parked_its_mark_undone(
        in_payments, payments_inbox, user_id):
    """Marked processed with the others as the batch locked it, a message with no handler is
    parked instead, its try counted once."""
    from tasks.inbox import _handle_in_one_transaction

    record, message_id = _request_record(user_id)
    payments_inbox([record])
    assert _handle_in_one_transaction("payments", [message_id], {}) == []
    row = _row(message_id)
    assert row.parked_at is not None and row.processed_at is None
    assert row.attempts == 1 and not row.try_open and row.last_error


def test_one_message_in_two_batches_at_once_is_handled_and_counted_once(
        settings, payments_inbox, user_id):
    """The batch that waited on the other's lock reads the row as that one left it, processed:
    it neither handles it nor marks it again."""
    from tasks.inbox import _handle_in_one_transaction

    record, message_id = _request_record(user_id)
    payments_inbox([record])
    assert _handled_by_two_at_once(
        lambda handlers: _handle_in_one_transaction("payments", [message_id], handlers),
        settings.database_url("payments"),
    ) == ([message_id], [[], []])  # (neither batch left it to retry)
    with service_app("payments").app_context():
        row = _row(message_id)
        assert row.attempts == 1 and row.processed_at is not None


def test_a_batch_that_waited_on_a_row_another_counted_a_failure_on_counts_its_own_on_top(
        settings, payments_inbox, user_id):
    """Another session counts failed tries of a message (not processing it) while the batch waits
    on its lock: the batch reads the row as that one left it, handles the message, and its attempt
    goes on top of the ones committed meanwhile."""
    from tasks.inbox import _handle_in_one_transaction

    database_url = settings.database_url("payments")
    records = [_request_record(user_id) for _ in range(2)]
    payments_inbox([record for record, _ in records])
    message_ids = [message_id for _, message_id in records]
    counting = psycopg2.connect(driver_dsn(database_url))
    try:
        with counting.cursor() as cursor:
            cursor.execute("UPDATE inbox_messages SET attempts = attempts + 3, last_error = 'x',"
                           " try_open = true WHERE message_id = %s", (str(message_ids[1]),))
        calls = []

        def handle():
            with service_app("payments").app_context():
                return _handle_in_one_transaction(
                    "payments", message_ids,
                    {PAYMENT_REQUESTED: lambda session, events: calls.extend(
                        event.message.message_id for event in events)})

        batch = OutcomeThread(handle)
        batch.start()
        wait_for_sessions_waiting_on_a_lock(database_url, timeout=10,
                                            what="the batch waiting on the counted row")
        counting.commit()
    finally:
        counting.close()
    assert batch.joined(30) == []
    assert sorted(calls) == sorted(message_ids)
    with service_app("payments").app_context():
        rows = [(row.attempts, row.processed_at is not None, row.try_open, row.last_error)
                for row in map(_row, message_ids)]
    assert rows == [(1, True, False, None), (4, True, False, None)]


def test_a_batch_handled_at_once_takes_only_messages_locked_marking_them(
        in_payments, payments_inbox, user_id):
    """handle_locked_messages_at_once marks nothing itself: given rows lock_in_order alone locked
    it would handle them and leave them unmarked, to be handled again. It refuses them."""
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    calls = []
    with pytest.raises(TypeError, match="MarkedBatch"), transaction() as session:
        handle_locked_messages_at_once(session, lock_in_order(session, [message_id]),
                                       {PAYMENT_REQUESTED: lambda _, events: calls.extend(events)})
    assert calls == [] and _row(message_id).processed_at is None


def _dividing_by_zero(session: Session) -> None:
    session.execute(text("SELECT 1 / 0"))


def _dividing_by_zero_on_a_driver_cursor(session: Session) -> None:
    with driver_cursor(session) as cursor:
        cursor.execute("SELECT 1 / 0")


def _flushing_a_row_the_database_refuses(session: Session) -> None:
    session.add(InboxMessage(message_id=uuid.uuid4()))  # (its topic, and more, NOT NULL)
    session.flush()


_NOT_NULL_VIOLATION = "NotNullViolation: null value in column"


def _swallowing_a_database_error(done: list[str], caught: list[BaseException] | None = None,
                                 failing=_dividing_by_zero) -> Handler:
    """A handler that asks for something after the commit (noted in `done` when it runs), runs a
    statement the database refuses (`failing`), catches the error (noted in `caught`, if given)
    and returns."""
    def handle(session, events):
        after_commit(session, lambda: done.append("the swallowing try's"))
        try:
            failing(session)
        except DBAPIError as exc:
            (caught if caught is not None else []).append(exc)
    return handle


_DIVISION_BY_ZERO = "DivisionByZero: division by zero (SQLSTATE 22012)"


@pytest.mark.parametrize("failing, said", [
    (_dividing_by_zero, _DIVISION_BY_ZERO),
    (_flushing_a_row_the_database_refuses, _NOT_NULL_VIOLATION)],
    ids=["a statement's error", "a flush's error"])
def test_a_handler_returning_on_a_database_error_it_caught_fails_its_try_and_no_other(
        in_payments, payments_inbox, user_id, failing, said):
    """Its savepoint left aborted (or rolled back by SQLAlchemy as its flush failed: closed as if
    done, the message was marked processed, what its handler wrote gone), the handler's try is
    counted as failed and undone, callbacks and all: the message handled before it in the batch
    is kept, not rolled back with it by a COMMIT psycopg2 answers with a rollback, and neither
    left for the sweeper. The error recorded names the one the handler caught."""
    from tasks.inbox import _handle_each_in_a_savepoint

    (good_record, good), (bad_record, bad) = (_request_record(user_id) for _ in range(2))
    payments_inbox([good_record, bad_record])
    done: list[str] = []
    swallowing = _swallowing_a_database_error(done, failing=failing)

    def handle(session, events):
        for event in events:
            if event.message.message_id == bad:
                swallowing(session, [event])
            else:
                after_commit(session, lambda: done.append("the good try's"))

    failed = _handle_each_in_a_savepoint("payments", [good, bad], {PAYMENT_REQUESTED: handle})
    assert failed == [bad]
    assert done == ["the good try's"]
    assert _row(good).processed_at is not None
    row = _row(bad)
    assert row.processed_at is None and row.attempts == 1 and "TransactionAborted" in row.last_error
    assert said in row.last_error


def test_a_handler_returning_on_a_lock_timeout_it_caught_is_held_up_and_counts_no_attempt(
        in_payments, payments_inbox, user_id):
    """As a lock timeout let out: the try is noted (so that the sweeper leaves the message to its
    retry), not counted, in a batch's one by one run; and a message's own task, which records the
    failure, is told it was held up (held_up_by_a_lock) and so counts none either."""
    from tasks.inbox import _handle_each_in_a_savepoint

    (record, message_id), (held_record, held) = (_request_record(user_id) for _ in range(2))
    payments_inbox([record, held_record])

    def swallowing_a_lock_timeout(session, events):
        session.execute(text("SET LOCAL lock_timeout = '50ms'"))
        with suppress(DBAPIError):
            session.execute(text("SELECT 1 FROM inbox_messages WHERE message_id = :id"
                                 " FOR UPDATE"), {"id": held})

    handlers = {PAYMENT_REQUESTED: swallowing_a_lock_timeout}
    with db.engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM inbox_messages WHERE message_id = :id FOR UPDATE"),
                       {"id": held})
        assert _handle_each_in_a_savepoint("payments", [message_id], handlers) == [message_id]
        with pytest.raises(TransactionAborted) as raised, transaction() as session:
            process_inbox_message(session, message_id, handlers)
        holder.rollback()
    row = _row(message_id)
    assert row.processed_at is None and row.parked_at is None
    assert row.attempts == 0 and row.last_attempt_at is not None
    assert held_up_by_a_lock(raised.value)
    assert "canceling statement due to lock timeout (SQLSTATE 55P03)" in str(raised.value)


@pytest.mark.parametrize("failing", [_dividing_by_zero, _dividing_by_zero_on_a_driver_cursor],
                         ids=["a statement of SQLAlchemy's", "a driver_cursor's"])
def test_a_transaction_left_aborted_by_an_error_caught_in_it_is_refused_not_committed(
        in_payments, failing):
    """Refused with TransactionAborted raised from the error caught, and naming it."""
    done: list[str] = []
    caught: list[BaseException] = []
    with pytest.raises(TransactionAborted) as raised, transaction() as session:
        _swallowing_a_database_error(done, caught, failing)(session, [])
    assert done == []
    assert len(caught) == 1 and raised.value.__cause__ is caught[0]
    assert _DIVISION_BY_ZERO in str(raised.value)


def test_a_flush_failure_caught_in_a_transaction_is_refused_naming_its_error(in_payments):
    """SQLAlchemy rolls the transaction back as its flush fails: the block that catches the error
    and goes on is refused with TransactionAborted raised from it and naming it, as for a
    statement's, not with the session's PendingRollbackError."""
    done: list[str] = []
    caught: list[BaseException] = []
    with pytest.raises(TransactionAborted) as raised, transaction() as session:
        _swallowing_a_database_error(done, caught, _flushing_a_row_the_database_refuses)(
            session, [])
    assert done == []
    assert len(caught) == 1 and raised.value.__cause__ is caught[0]
    assert "a flush failed and its error was caught" in str(raised.value)
    assert _NOT_NULL_VIOLATION in str(raised.value) and "(SQLSTATE 23502)" in str(raised.value)


def _running(session: Session, statement: str) -> None:
    session.execute(text(statement))


def _running_on_a_driver_cursor(session: Session, statement: str) -> None:
    with driver_cursor(session) as cursor:
        cursor.execute(statement)


@pytest.mark.parametrize("rolling_back", [_running, _running_on_a_driver_cursor],
                         ids=["a statement of SQLAlchemy's", "a driver_cursor's"])
def test_an_error_rolled_back_to_a_savepoint_by_hand_is_never_named_for_a_later_abort(
        in_payments, rolling_back):
    """A ROLLBACK TO SAVEPOINT of the caller's own makes the transaction sound again, as
    SQLAlchemy's does: the error it undid is not held against a later abort, which SQLAlchemy did
    not see."""
    with pytest.raises(TransactionAborted) as raised, transaction() as session:
        session.execute(text("SAVEPOINT own"))
        with suppress(DBAPIError):
            session.execute(text("SELECT 1 / 0"))
        rolling_back(session, "ROLLBACK TO SAVEPOINT own")
        _failing_on_a_bare_driver_cursor(session.connection())
    assert raised.value.__cause__ is None and "not seen" in str(raised.value)


def _failing_on_a_bare_driver_cursor(connection) -> None:
    """A statement the database refuses, on a driver cursor SQLAlchemy hears nothing of, caught."""
    with suppress(psycopg2.Error), connection.connection.dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT 'not a number'::int")


def test_an_error_caught_then_rolled_back_is_never_named_for_a_later_abort(in_payments):
    """An aborted transaction names the error caught in it (or in its savepoint under way), never
    one of a savepoint rolled back since, or of an earlier transaction on the same connection:
    aborted by a statement SQLAlchemy did not see, it says so."""
    with pytest.raises(TransactionAborted) as raised, transaction() as session:
        with suppress(DBAPIError), session.begin_nested():
            session.execute(text("SELECT 1 / 0"))
        _failing_on_a_bare_driver_cursor(session.connection())
    assert raised.value.__cause__ is None and "not seen" in str(raised.value)
    for ending in ("rollback", "commit"):  # (a commit of an aborted one: psycopg2 rolls back)
        with db.engine.connect() as connection:
            with suppress(DBAPIError):
                connection.execute(text("SELECT 1 / 0"))
            getattr(connection, ending)()
            _failing_on_a_bare_driver_cursor(connection)
            with pytest.raises(TransactionAborted) as raised:
                refuse_if_aborted(connection, "aborted")
            assert raised.value.__cause__ is None, ending


def test_a_session_that_ran_a_transaction_is_freed_without_the_cycle_collector(in_payments):
    """What transaction() notes of a session's transaction holds nothing alive: removed, the
    session goes at once, the transaction, its connection and any error noted on it with it."""
    gc.disable()
    try:
        with transaction() as session:
            session.execute(text("SELECT 1"))
        gone = weakref.ref(session)
        del session
        db.session.remove()
        assert gone() is None
    finally:
        gc.enable()


def test_a_transaction_that_ran_no_statement_takes_no_connection_to_commit(in_payments):
    """Its look for a statement failed and caught (TransactionAborted) takes no connection from
    the pool: there is none to look at."""
    checkouts = []

    def checked_out(*_):
        checkouts.append(1)

    sa.event.listen(db.engine, "checkout", checked_out)
    try:
        with transaction() as session:
            session.begin_nested()
    finally:
        sa.event.remove(db.engine, "checkout", checked_out)
    assert checkouts == []


def test_the_sweeper_leaves_a_message_a_handler_holds(in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    payments_inbox([record])
    with _held_by_a_handler(message_id) as sweeping:
        assert message_id not in _claimed(sweeping, timedelta(seconds=-1))
        sweeping.rollback()


def test_raw_value_keeps_what_was_received(in_payments, payments_inbox):
    record = _record(json.dumps({"type": "PaymentRequested"}).encode())
    payments_inbox([record])
    row = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == record.topic, InboxMessage.offset == record.offset)).one()
    assert json.loads(row.raw_value) == {"type": "PaymentRequested"}


def test_the_consumer_stores_on_a_connection_of_its_own_and_replaces_it_once_lost(
        in_payments, payments_inbox, settings, user_id):
    """The consumer writes each batch in autocommit on a connection of its own. When
    the database drops that connection, the batch fails (the consumer reads it again from Kafka)
    and the next one opens a new connection."""
    first, first_id = _request_record(user_id)
    assert payments_inbox([first, first]) == [first_id]
    terminate_backend(settings.payments_database_url, payments_inbox._connection.get_backend_pid())
    second, second_id = _request_record(user_id)
    with pytest.raises(psycopg2.OperationalError):
        payments_inbox([second])
    assert payments_inbox([second]) == [second_id]
    assert payments_inbox([first]) == []  # stored once, whichever connection it came by
    assert _row(second_id).processed_at is None  # stored, and waiting to be handled


def test_records_that_cannot_be_read_or_stored_as_they_are_are_parked_not_stuck(
        in_payments, payments_inbox, user_id):
    """A NUL character or an unpaired surrogate in a record (its value, key, headers or an
    envelope's text), or JSON too deep or too large to parse, must not make the batch's insert
    fail, or the consumer would read the same records again and again and the partition would
    stop there."""
    envelope, _ = _request_record(user_id)
    with_nul_correlation = json.loads(envelope.value)
    with_nul_correlation["correlation_id"] = "a\u0000b"
    with_surrogate_correlation = json.loads(envelope.value)
    with_surrogate_correlation["correlation_id"] = "\udc80"
    with_long_correlation = json.loads(envelope.value)
    with_long_correlation["correlation_id"] = "c" * 101
    records = [
        _record(b"\x00\xff binary"),
        _record(json.dumps(with_nul_correlation).encode()),
        _record(json.dumps(with_surrogate_correlation).encode()),
        _record(json.dumps(with_long_correlation).encode()),
        _record(b"[" * 5000 + b"]" * 5000),
        _record(b'{"amount": 1e1000000000000000000}'),
        ConsumedRecord("test-topic", 0, next(_offsets), b"key\x00", b"{}",
                       {"request_id": b"id\x00"}),
    ]
    good, good_id = _request_record(user_id)
    assert payments_inbox([*records, good]) == [good_id]
    rows = db.session.scalars(select(InboxMessage).where(
        InboxMessage.offset.in_([record.offset for record in records]),
        InboxMessage.topic == "test-topic")).all()
    assert len(rows) == len(records) and all(row.parked_at is not None for row in rows)
    assert all("\x00" not in (row.raw_value or "") + (row.key or "") + (row.last_error or "")
               for row in rows)


@pytest.mark.parametrize("header, stored", [
    (b"click-12345678", "click-12345678"),
    (b"click-aaaa,click-bbbb", None),
    (b"click-aaaa] forged\n2026-01-01 00:00:00 INFO x [request_id=click-bbbb", None),
    (b"c" * 129, None),
    (b"\xffclick-12345678", None),
], ids=["sane", "a comma", "a bracket and a line break", "longer than 128", "not UTF-8"])
def test_a_records_request_id_is_stored_only_if_it_is_sane(in_payments, payments_inbox, user_id,
                                                           header, stored):
    """As over HTTP and gRPC: an id of anyone's making (a comma in it would be logged as two
    messages' ids are, a line break would forge a line) is stored as none, and the message is
    stored and handled all the same."""
    record, message_id = _request_record(user_id)
    record = ConsumedRecord(record.topic, record.partition, record.offset, record.key,
                            record.value, record.headers | {"request_id": header})
    assert payments_inbox([record]) == [message_id]
    assert _row(message_id).request_id == stored


@pytest.mark.parametrize("header, causation_id, stored", [
    (None, "click-12345678", "click-12345678"),
    (b"click-aaaa,click-bbbb", "click-12345678", "click-12345678"),
    (b"click-87654321", "click-12345678", "click-87654321"),
    (None, "click-aaaa,click-bbbb", None),
    (None, None, None),
], ids=["no header", "a header of no sane id", "the header first", "no sane causation_id",
        "neither"])
def test_a_records_request_id_is_its_envelopes_causation_id_when_its_header_gives_none(
        in_payments, payments_inbox, user_id, header, causation_id, stored):
    """The shop writes the two alike; a producer that writes only `causation_id` is followed too,
    its id checked as a header's is."""
    record, message_id = _request_record(user_id)
    value = encode(json.loads(record.value) | {"causation_id": causation_id})
    record = ConsumedRecord(record.topic, record.partition, record.offset, record.key, value,
                            record.headers | ({} if header is None else {"request_id": header}))
    assert payments_inbox([record]) == [message_id]
    assert _row(message_id).request_id == stored


def test_an_unparseable_record_cannot_take_a_valid_messages_id(in_payments, payments_inbox,
                                                               user_id):
    """A broken record whose headers name a real message's id is parked under its own position,
    and the real message, arriving after it, is still stored and handled."""
    good, good_id = _request_record(user_id)
    squatter = _record(b"{broken", {"message_id": str(good_id).encode()})
    assert payments_inbox([squatter]) == []
    assert payments_inbox([squatter]) == []  # read again: the same parked row
    assert payments_inbox([good]) == [good_id]
    parked = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == "test-topic", InboxMessage.offset == squatter.offset)).all()
    assert len(parked) == 1 and parked[0].parked_at is not None
    assert parked[0].message_id != good_id


def test_a_message_of_another_type_under_an_id_taken_in_its_batch_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Two messages of different types under one id in a batch: the first is stored under it, the
    other, no repeat of it, is parked under an id of its own with why (dropped, it was lost
    unsaid), as it came, so that it can be replayed; a true repeat beside them is still dropped,
    and the parked one, read again, is the same row."""
    record, message_id = _request_record(user_id)
    body = json.loads(record.value) | {"type": PAYMENT_FAILED}
    body["payload"]["reason"] = "NO_ACCOUNT"
    other = _record(encode(body), {"request_id": b"click-12345678"})
    assert payments_inbox([record, other, record]) == [message_id]
    assert payments_inbox([other]) == []
    parked = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == other.topic, InboxMessage.offset == other.offset)).all()
    assert len(parked) == 1 and parked[0].parked_at is not None
    assert parked[0].message_id != message_id and parked[0].raw_value is None
    assert (parked[0].type, parked[0].envelope_version, parked[0].correlation_id,
            parked[0].request_id, parked[0].payload) == (PAYMENT_FAILED, 1, body["correlation_id"],
                                                         "click-12345678", body["payload"])
    assert f"{message_id} is that of a 'PaymentRequested' message already" in parked[0].last_error
    assert _row(message_id).parked_at is None


def test_a_message_of_another_payload_under_a_taken_id_is_parked_and_a_resend_dropped(
        in_payments, payments_inbox, user_id):
    """A message of the same type as the one stored under its id, but of another payload, is no
    repeat either (a producer reusing ids): parked, in its batch or after it, not dropped unsaid;
    the message itself sent again (a relay's resend, a record read again: the same payload) is
    still a repeat, dropped."""
    record, message_id = _request_record(user_id)
    body = json.loads(record.value)
    body["payload"]["amount"] = "2.00"
    other = _record(encode(body))
    body["payload"]["amount"] = "3.00"
    later = _record(encode(body))
    resent = _record(record.value)
    assert payments_inbox([record, other, resent]) == [message_id]
    assert payments_inbox([later, resent]) == []
    parked = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == record.topic,
        InboxMessage.offset.in_([other.offset, later.offset, resent.offset]))).all()
    assert sorted(row.offset for row in parked) == [other.offset, later.offset]
    assert all(row.parked_at is not None and row.message_id != message_id for row in parked)
    assert all(f"{message_id} is that of a 'PaymentRequested' message already: one of another"
               " payload" in row.last_error for row in parked)


def test_a_message_under_a_taken_id_sent_again_is_parked_and_said_once(
        in_payments, payments_inbox, user_id, caplog):
    """A producer retrying a message under a taken id sends it again at another offset: the same
    message, parked once under the same id of its own, and said once, not once per resend."""
    record, message_id = _request_record(user_id)
    body = json.loads(record.value) | {"type": PAYMENT_FAILED}
    body["payload"]["reason"] = "NO_ACCOUNT"
    other, retried, retried_later = (_record(encode(body)) for _ in range(3))
    caplog.set_level(logging.ERROR, logger="shared.inbox.storing")
    assert payments_inbox([record, other, retried]) == [message_id]
    assert payments_inbox([retried_later]) == []
    offsets = [other.offset, retried.offset, retried_later.offset]
    parked = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == other.topic, InboxMessage.offset.in_(offsets))).all()
    assert [row.offset for row in parked] == [other.offset]
    said = [entry.getMessage() for entry in caplog.records if str(message_id) in entry.getMessage()]
    assert len(said) == 1 and str(parked[0].message_id) in said[0]


def test_records_parked_as_they_arrive_are_said_a_line_a_reason_naming_ten_at_most(
        in_payments, payments_inbox, user_id, caplog):
    """A producer flooding a topic with what cannot be handled (misconfigured, or a replay tool)
    must not flood the log with a line a record: the records of a batch parked for one reason are
    said in one ERROR line, naming ten of them, where they sat, and counting the others; those
    parked for another reason in a line of their own (messages under taken ids, each naming the
    id it took)."""
    caplog.set_level(logging.ERROR, logger="shared.inbox.storing")
    broken = [_record(b"not json") for _ in range(13)]
    stored = [_request_record(user_id)[0] for _ in range(2)]
    taking = []
    for record in stored:
        body = json.loads(record.value) | {"type": PAYMENT_FAILED}
        body["payload"]["reason"] = "NO_ACCOUNT"
        taking.append(_record(encode(body)))
    payments_inbox(stored)
    assert payments_inbox([*broken, *taking]) == []
    said = [entry.getMessage() for entry in caplog.records
            if "as they arrived" in entry.getMessage()]
    assert len(said) == 2
    [flood] = [line for line in said if "not UTF-8 JSON" in line]
    assert flood.startswith("parked inbox message(s) as they arrived (13): ")
    assert flood.count(" (test-topic [0] @ ") == 10
    assert ", +3-more: value is not UTF-8 JSON" in flood
    [taken] = [line for line in said if line != flood]
    assert taken.startswith("parked inbox message(s) as they arrived (2): ")
    assert all(f"under message_id {json.loads(record.value)['message_id']})" in taken
               for record in stored)
    assert taken.endswith(": its message_id is that of a 'PaymentRequested' message already: a"
                          " 'PaymentFailed' message under it is another message, not a repeat")


class _PrunedBeforeTheRead(psycopg2.extensions.cursor):
    """A cursor on which the inbox row of `pruned` is deleted, as the pruner deletes a handled
    message's row, just before insert_records, its insert done, reads back the messages stored
    under the ids the insert passed over."""

    pruned: uuid.UUID | None = None

    def execute(self, query, vars=None):
        if self.pruned is not None and query == taken_ids._STORED_MESSAGES:
            super().execute("DELETE FROM inbox_messages WHERE message_id = %s", (self.pruned,))
            self.pruned = None
        return super().execute(query, vars)


def test_a_message_under_a_taken_id_is_no_repeat_though_the_message_taking_it_is_pruned_meanwhile(
        in_payments, settings, user_id):
    """A batch holding a message stored before, sent again, and another message under its id: if
    the stored one is pruned after the insert passed over both and before they are compared with
    it, the other is compared with the batch's first message under the id, and parked, not taken
    for a repeat and dropped."""
    record, message_id = _request_record(user_id)
    body = json.loads(record.value) | {"type": PAYMENT_FAILED}
    body["payload"]["reason"] = "NO_ACCOUNT"
    other = _record(encode(body))
    connection = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            assert insert_records(cursor, [record]) == [message_id]
        with connection.cursor(cursor_factory=_PrunedBeforeTheRead) as cursor:
            cursor.pruned = str(message_id)
            assert insert_records(cursor, [_record(record.value), other]) == []
            assert cursor.pruned is None  # (pruned as the test meant)
    finally:
        connection.close()
    assert _row(message_id) is None
    parked = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == other.topic, InboxMessage.offset == other.offset)).all()
    assert [(row.type, row.parked_at is not None) for row in parked] == [(PAYMENT_FAILED, True)]
    assert f"{message_id} is that of a 'PaymentRequested' message already" in parked[0].last_error


def test_another_unparseable_record_at_a_parked_ones_position_is_parked_too(in_payments,
                                                                            payments_inbox):
    """A topic deleted and made again starts its offsets at 0: a broken record there meets the
    parked row of an old one at the same position, and must be kept beside it, not dropped."""
    old = _record(b"{broken")
    new = ConsumedRecord(old.topic, old.partition, old.offset, None, b"{also broken", {})
    assert payments_inbox([old]) == [] and payments_inbox([new]) == []
    parked = db.session.scalars(select(InboxMessage.raw_value).where(
        InboxMessage.topic == old.topic, InboxMessage.offset == old.offset)).all()
    assert sorted(parked) == ["{also broken", "{broken"]


def _from_a_newer_producer(user_id: str, as_written: dict[str, bytes] | None = None,
                           **changes) -> tuple[ConsumedRecord, dict]:
    """A PaymentRequested as a newer version of its producer might send it; `as_written`: JSON
    text put where the body holds each of these strings (a number as json.dumps never writes it)."""
    record, _ = _request_record(user_id)
    body = json.loads(record.value) | changes
    value = encode(body)
    for placeholder, written in (as_written or {}).items():
        value = value.replace(json.dumps(placeholder).encode(), written)
    return _record(value), body


class _PaymentFailedWithCardExpired(PaymentFailedSchema):
    """The contract as an upgraded reader has it: a reason the newer producer began to send."""

    reason = fields.String(required=True,
                           validate=validate.OneOf((*FAILURE_REASONS, "CARD_EXPIRED")))


def _replayed_once_the_reason_is_known(message_id: uuid.UUID,
                                       monkeypatch) -> tuple[dict, list[ReceivedEvent]]:
    """Upgrade this reader's contract (_PaymentFailedWithCardExpired) and replay the parked
    message; returns handlers that note each event they are handed, and the list they note in."""
    monkeypatch.setitem(PAYLOAD_SCHEMAS, PAYMENT_FAILED, _PaymentFailedWithCardExpired())
    assert unpark_messages(db.session, [message_id]) == [message_id]
    db.session.commit()
    seen: list[ReceivedEvent] = []
    handlers = {PAYMENT_FAILED: lambda session, events: seen.extend(events)}
    return handlers, seen


def _failed_payment_with_a_new_reason(user_id: str, **payload_changes) -> dict:
    body = json.loads(_request_record(user_id)[0].value)
    return body["payload"] | {"reason": "CARD_EXPIRED"} | payload_changes


def test_a_message_from_a_newer_producer_is_kept_with_its_payload_and_handled_once_known(
        in_payments, payments_inbox, user_id, monkeypatch):
    """A payload with a value this service does not know yet (its producer upgraded first) is
    parked under its own id with its payload as sent, not as raw text that can never be handled
    (its offset is committed: Kafka will not deliver it again). Replayed once this service knows
    the value, it is handled, once; a field its contract still does not declare, kept with the
    payload as sent, reaches the handler neither in the payload nor in the message."""
    payload = _failed_payment_with_a_new_reason(user_id, channel="web")
    record, body = _from_a_newer_producer(user_id, type=PAYMENT_FAILED, payload=payload)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []  # parked, not dispatched
    assert payments_inbox([record]) == []  # delivered again: the same row
    row = _row(message_id)
    assert row.parked_at is not None and row.raw_value is None
    assert (row.type, row.payload) == (PAYMENT_FAILED, body["payload"])
    assert "payload breaks the contract" in row.last_error

    handlers, seen = _replayed_once_the_reason_is_known(message_id, monkeypatch)
    for _ in range(2):
        with transaction() as session:
            process_inbox_message(session, message_id, handlers)
    assert [event.payload["reason"] for event in seen] == ["CARD_EXPIRED"]
    assert "channel" not in seen[0].payload
    assert seen[0].message.payload == {name: value for name, value in payload.items()
                                       if name != "channel"}


def test_a_message_of_a_type_not_known_yet_is_kept_to_be_replayed(in_payments, payments_inbox,
                                                                  user_id):
    record, body = _from_a_newer_producer(user_id, type="PaymentRefunded")
    assert payments_inbox([record]) == []
    row = _row(uuid.UUID(body["message_id"]))
    assert row.parked_at is not None and row.type == "PaymentRefunded"
    assert row.payload == body["payload"] and "unknown message type" in row.last_error
    assert unpark_messages(db.session, [row.message_id]) == [row.message_id]  # replayable
    db.session.rollback()


# A message stored, then its record read again: the row keeping its value's digest, or stored by
# the release before digests, without one (as the rows stored before it are).
_WITH_ITS_DIGEST_OR_BY_THE_RELEASE_BEFORE = pytest.mark.parametrize(
    "digest_kept", [True, False], ids=["with its digest", "stored by the release before"])


def _as_the_release_before_stored_it(message_id: uuid.UUID) -> None:
    """The message's row without the digest of its value, as the release before stores it."""
    db.session.execute(text("UPDATE inbox_messages SET value_digest = NULL"
                            " WHERE message_id = :id"), {"id": str(message_id)})
    db.session.commit()


@_WITH_ITS_DIGEST_OR_BY_THE_RELEASE_BEFORE
def test_a_message_read_again_by_a_reader_that_knows_more_of_it_is_a_repeat(
        in_payments, payments_inbox, user_id, monkeypatch, digest_kept):
    """In a rolling upgrade a record may be stored by one release and read again (a rebalance)
    by the next, which stores its payload otherwise: a field the first did not know of (kept as
    sent, in a payload it refused) dropped as its contract has it. It is the same message, a
    repeat, not one of another payload under its id."""
    payload = _failed_payment_with_a_new_reason(user_id, channel="web")
    record, body = _from_a_newer_producer(user_id, type=PAYMENT_FAILED, payload=payload)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []  # refused: parked with its payload as sent
    if not digest_kept:
        _as_the_release_before_stored_it(message_id)
    monkeypatch.setitem(PAYLOAD_SCHEMAS, PAYMENT_FAILED, _PaymentFailedWithCardExpired())
    assert "channel" not in inbox_row(record)["payload"]  # read whole now, stored without it
    assert payments_inbox([record]) == []
    assert db.session.scalars(select(InboxMessage.message_id).where(
        InboxMessage.topic == record.topic, InboxMessage.offset == record.offset)).all() == [
            message_id]


@_WITH_ITS_DIGEST_OR_BY_THE_RELEASE_BEFORE
def test_a_message_read_again_by_a_reader_that_knows_more_of_it_is_a_repeat_in_any_form_sent(
        in_payments, payments_inbox, user_id, monkeypatch, digest_kept):
    """A payload refused is kept as sent, one taken is stored in its contract's form (an amount
    sent as 10.5 as "10.50", a UUID in lower case): a record stored refused by one release and
    read again by the next, which takes it, is still that message, a repeat, not parked as
    another (replayed, it would be handled twice)."""
    payload = _failed_payment_with_a_new_reason(user_id, amount="__AMOUNT__")
    payload["order_id"] = payload["order_id"].upper()
    record, body = _from_a_newer_producer(user_id, {"__AMOUNT__": b"10.5"}, type=PAYMENT_FAILED,
                                          payload=payload)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []  # refused: kept as sent
    if not digest_kept:
        _as_the_release_before_stored_it(message_id)
    monkeypatch.setitem(PAYLOAD_SCHEMAS, PAYMENT_FAILED, _PaymentFailedWithCardExpired())
    assert inbox_row(record)["payload"]["amount"] == "10.50"  # taken now, stored otherwise
    assert payments_inbox([record]) == []
    assert [row.message_id for row in _stored_at(record)] == [message_id]


@_WITH_ITS_DIGEST_OR_BY_THE_RELEASE_BEFORE
def test_a_message_read_again_by_a_reader_that_knows_less_of_it_is_a_repeat(
        in_payments, payments_inbox, user_id, monkeypatch, digest_kept):
    """The other way round (a partition handed to an instance not upgraded yet, or a rollback):
    stored in its contract's form by a release that takes it, a record read again by one that
    refuses it (a reason it does not know) is still a repeat: each field is compared as that
    release's contract reads it where it can (an amount sent as 10.5 and stored as "10.50"), and
    a field the first dropped (one its contract does not declare) makes no other message."""
    payload = _failed_payment_with_a_new_reason(user_id, amount="__AMOUNT__", channel="web")
    record, body = _from_a_newer_producer(user_id, {"__AMOUNT__": b"10.5"}, type=PAYMENT_FAILED,
                                          payload=payload)
    message_id = uuid.UUID(body["message_id"])
    with monkeypatch.context() as upgraded:
        upgraded.setitem(PAYLOAD_SCHEMAS, PAYMENT_FAILED, _PaymentFailedWithCardExpired())
        assert payments_inbox([record]) == [message_id]
    if not digest_kept:
        _as_the_release_before_stored_it(message_id)
    assert payments_inbox([record]) == []
    assert [row.message_id for row in _stored_at(record)] == [message_id]


class _Refund(ContractSchema):
    """A type a later release knows and this one does not."""

    order_id = fields.UUID(required=True)
    amount = Amount(required=True)


def _refund_stored_by_a_later_release(payments_inbox, user_id: str,
                                      monkeypatch) -> tuple[ConsumedRecord, uuid.UUID]:
    """A "Refund" (a type only a later release knows), its amount sent as 10.5 and its order id in
    upper case, stored by a later release in its contract's form ("10.50", lower case): the record
    and its message id."""
    payload = {"order_id": str(uuid.uuid4()).upper(), "amount": "__AMOUNT__"}
    record, body = _from_a_newer_producer(user_id, {"__AMOUNT__": b"10.5"}, type="Refund",
                                          payload=payload)
    with monkeypatch.context() as later:
        later.setitem(PAYLOAD_SCHEMAS, "Refund", _Refund())
        contracts.declared_fields.cache_clear()
        assert inbox_row(record)["payload"]["amount"] == "10.50"  # stored in its form
        payments_inbox([record])
    contracts.declared_fields.cache_clear()
    return record, uuid.UUID(body["message_id"])


@_WITH_ITS_DIGEST_OR_BY_THE_RELEASE_BEFORE
def test_a_message_of_a_type_only_a_later_release_knows_read_again_by_this_one_is_a_repeat(
        in_payments, payments_inbox, user_id, monkeypatch, digest_kept):
    """A later release stores a type it knows in its contract's form (an amount sent as 10.5 as
    "10.50", a UUID in lower case); this one, not knowing the type, cannot read the record's
    payload so: the same bytes read again by it (a partition handed back in a rolling upgrade)
    are a repeat, never parked as another message (replayed, it would be handled twice)."""
    record, message_id = _refund_stored_by_a_later_release(payments_inbox, user_id, monkeypatch)
    if not digest_kept:
        _as_the_release_before_stored_it(message_id)
    assert payments_inbox([record]) == []
    assert [row.message_id for row in _stored_at(record)] == [message_id]


def test_a_later_releases_message_serialised_again_is_parked_said_to_be_maybe_a_repeat(
        in_payments, payments_inbox, user_id, monkeypatch):
    """The limit of the strict judgement: a message of a type only a later release knows, stored
    by it in its contract's form ("10.50", a UUID in lower case) with its digest, and serialised
    again by a tool (other bytes), cannot be told from another message by this release. It is
    parked, not dropped (a real other message dropped would be lost unsaid), and its reason says
    that it may be a repeat, to be compared with the stored one before it is replayed."""
    record, message_id = _refund_stored_by_a_later_release(payments_inbox, user_id, monkeypatch)
    serialised_again = _serialised_again(record)
    assert payments_inbox([serialised_again]) == []
    [parked] = _stored_at(serialised_again)
    assert parked.parked_at is not None and parked.message_id != message_id
    assert "may be a repeat" in parked.last_error and "compare" in parked.last_error


def test_a_message_under_an_id_whose_stored_payload_cannot_be_read_back_is_parked(
        in_payments, payments_inbox, user_id):
    """A stored payload Python cannot read back (a number past loads_strict's digits: a row
    written by hand, or by a tool) makes a record of other bytes under its id parked, not its
    partition blocked by an error on every batch that holds it. (The same bytes again are a
    repeat, the payload unread.)"""
    record, message_id = _request_record(user_id)
    assert payments_inbox([record]) == [message_id]
    db.session.execute(text("UPDATE inbox_messages SET payload = ('{\"n\": ' || repeat('9', 5000)"
                            " || '}')::jsonb WHERE message_id = :id"), {"id": str(message_id)})
    db.session.commit()
    assert payments_inbox([_record(record.value), _serialised_again(record)]) == []
    assert db.session.scalar(text(
        "SELECT count(*) FROM inbox_messages WHERE parked_at IS NOT NULL"
        " AND last_error LIKE :taken"), {"taken": f"its message_id {message_id} %"}) == 1


def test_a_message_under_a_taken_id_read_again_by_another_release_is_parked_once(
        in_payments, payments_inbox, user_id, monkeypatch):
    """The id a message under a taken id is parked under is made of the record as sent, not of
    its payload as a release stores it (the one before keeps a payload it refuses as sent, a field
    more; the next drops the field): read again by the next release, it is the same row."""
    stored, message_id = _request_record(user_id)
    assert payments_inbox([stored]) == [message_id]
    payload = _failed_payment_with_a_new_reason(user_id, channel="web")
    record, _ = _from_a_newer_producer(user_id, type=PAYMENT_FAILED, payload=payload,
                                       message_id=str(message_id))
    assert payments_inbox([record]) == []
    monkeypatch.setitem(PAYLOAD_SCHEMAS, PAYMENT_FAILED, _PaymentFailedWithCardExpired())
    resent = _record(record.value)
    assert payments_inbox([resent]) == []
    parked = _stored_at(record, resent)
    assert [(row.offset, row.parked_at is not None) for row in parked] == [(record.offset, True)]


def test_a_message_missing_a_field_of_the_one_stored_under_its_id_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Storing a message drops no field it was sent with but those its contract does not
    declare: a payload refused for a field missing (no amount) under the id of a message with the
    field is another message, parked, not dropped unsaid as that message sent again."""
    stored, message_id = _request_record(user_id)
    assert payments_inbox([stored]) == [message_id]
    body = json.loads(stored.value)
    del body["payload"]["amount"]
    other = _record(encode(body))
    assert payments_inbox([other]) == []
    [parked] = _stored_at(other)
    assert parked.parked_at is not None and parked.message_id != message_id
    assert "one of another payload under it is another message" in parked.last_error
    assert "payload breaks the contract" in parked.last_error


def _parked_under_its_own_id(stored: ConsumedRecord, message_id: uuid.UUID,
                             *others: ConsumedRecord) -> list[ConsumedRecord]:
    """Of records under the id `stored` was stored under, each sent after it, those parked as
    other messages (under ids of their own): the others were dropped as repeats."""
    rows = {row.offset: row for row in _stored_at(stored, *others)}
    assert rows[stored.offset].message_id == message_id
    parked = [record for record in others if record.offset in rows]
    assert all(rows[record.offset].parked_at is not None
               and rows[record.offset].message_id != message_id for record in parked)
    return parked


def _assert_another_parked_and_repeats_dropped(payments_inbox, stored: ConsumedRecord,
                                               message_id: uuid.UUID, body: dict) -> None:
    """`body` (`stored`'s, changed) sent under `stored`'s id is parked as another message; the
    same bytes as `stored` again, and `stored` serialised again, are dropped as repeats."""
    other = _record(encode(body))
    resent, serialised_again = _record(stored.value), _serialised_again(stored)
    assert payments_inbox([other, resent, serialised_again]) == []
    assert _parked_under_its_own_id(stored, message_id, other, resent, serialised_again) == [
        other]


def test_a_message_of_a_type_this_release_does_not_know_under_a_taken_id_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Under the id of a message of a type this release does not know, another of that type (its
    payload another) is parked, not dropped unsaid as a repeat: the same bytes again are the
    repeat, told by their digest, and the message serialised again otherwise (its payload the
    same as sent) is one too."""
    stored, body = _from_a_newer_producer(user_id, type="Refund", payload={
        "order_id": str(uuid.uuid4()), "amount": "10.50"})
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([stored]) == []  # parked: a type not known yet
    body["payload"]["amount"] = "20.00"
    _assert_another_parked_and_repeats_dropped(payments_inbox, stored, message_id, body)


def test_a_message_with_a_value_its_contract_refuses_under_a_taken_id_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Under the id of a message whose payload this release's contract refuses (a reason it does
    not know), another one, with another value the contract refuses there, is parked, not dropped
    unsaid as a repeat: a refused value is compared as sent where the message stored keeps the
    digest of its bytes. The same bytes again, and the message serialised again otherwise, are
    repeats."""
    payload = _failed_payment_with_a_new_reason(user_id)
    stored, body = _from_a_newer_producer(user_id, type=PAYMENT_FAILED, payload=payload)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([stored]) == []  # refused: parked with its payload as sent
    body["payload"]["reason"] = "CARD_STOLEN"
    _assert_another_parked_and_repeats_dropped(payments_inbox, stored, message_id, body)


def test_a_message_with_a_field_the_one_stored_under_its_id_lacks_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Under the id of a message refused for a field missing (no amount), one with the field is
    another message, parked, not dropped unsaid as that message sent again: the message stored
    keeps the digest of its bytes, so it was not stored by a release that dropped the field."""
    record, message_id = _request_record(user_id)
    body = json.loads(record.value)
    del body["payload"]["amount"]
    stored = _record(encode(body))
    assert payments_inbox([stored]) == []  # refused: parked with its payload as sent
    assert payments_inbox([record]) == []
    assert _parked_under_its_own_id(stored, message_id, record) == [record]


def _of_envelope_version_2(user_id: str) -> tuple[ConsumedRecord, dict]:
    """A PaymentRequested in an envelope of version 2, as a producer newer than this reader might
    send it, with a field more in its envelope."""
    body = json.loads(_request_record(user_id)[0].value) | {"version": 2, "trace": "t-1"}
    return _record(encode(body)), body


def _upgraded_to_envelope_version_2(monkeypatch) -> None:
    """This reader as its upgrade has it: knowing envelope version 2, whose envelope is version
    1's with fields it may drop."""
    monkeypatch.setattr(contracts, "KNOWN_ENVELOPE_VERSIONS", frozenset({1, 2}))


def _replayed(message_id: uuid.UUID, handlers) -> Outcome:
    assert unpark_messages(db.session, [message_id]) == [message_id]
    db.session.commit()
    with transaction() as session:
        return process_inbox_message(session, message_id, handlers)


def test_a_message_of_an_envelope_version_not_known_yet_is_kept_and_handled_once_known(
        in_payments, payments_inbox, user_id, monkeypatch):
    """A message whose envelope version this service does not know yet (its producer upgraded
    first) is parked under its own id with its version and its text as it came, not as raw text
    under its position (its offset is committed: Kafka will not deliver it again), and with no
    payload, which the release before envelope_version would replay as version 1. Replayed before
    this service knows the version, it is parked again, not handled as a version it is not, even
    with its row's version gone back to 1 (the column dropped by a downgrade and made again);
    replayed once it knows it, it is read whole and handled, once."""
    record, body = _of_envelope_version_2(user_id)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []  # parked, not dispatched
    assert payments_inbox([record]) == []  # delivered again: the same row
    row = _row(message_id)
    assert row.parked_at is not None and row.payload is None
    assert (row.type, row.envelope_version, row.raw_value) == (PAYMENT_REQUESTED, 2,
                                                               record.value.decode())
    assert row.correlation_id == body["correlation_id"]
    assert "envelope version 2 is not one this reader knows" in row.last_error

    seen: list[ReceivedEvent] = []
    handlers = {PAYMENT_REQUESTED: lambda session, events: seen.extend(events)}
    assert _replayed(message_id, handlers) == Outcome.PARKED
    db.session.execute(text("UPDATE inbox_messages SET envelope_version = 1"
                            " WHERE message_id = :id"), {"id": message_id})
    assert _replayed(message_id, handlers) == Outcome.PARKED
    assert seen == []
    assert "envelope version 2 is not one this reader knows" in _row(message_id).last_error

    _upgraded_to_envelope_version_2(monkeypatch)
    assert _replayed(message_id, handlers) == Outcome.PROCESSED
    with transaction() as session:
        assert process_inbox_message(session, message_id, handlers) == Outcome.ALREADY_DONE
    assert [event.message.message_id for event in seen] == [message_id]
    assert seen[0].message.envelope_version == 2
    assert seen[0].payload == {"order_id": uuid.UUID(body["payload"]["order_id"]),
                               "user_id": user_id, "amount": Decimal("1.00")}
    assert seen[0].message.payload == body["payload"]
    assert _row(message_id).processed_at is not None


def test_a_replay_of_a_kept_message_refuses_what_a_fresh_read_of_it_would(
        in_payments, payments_inbox, user_id, monkeypatch):
    """Kept while its version was unknown, a message was read only as far as what every version
    carries. Once the version is known, its replay reads it whole, as the consumer reads a new
    message: a version-2 envelope that breaks version 2's contract as this reader has it (a field
    it requires renamed) is parked again, with the reason a fresh read gives, never handed to its
    handler."""
    record, body = _of_envelope_version_2(user_id)
    body["sent_at"] = body.pop("occurred_at")
    record = _record(encode(body))
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []
    seen: list[ReceivedEvent] = []
    handlers = {PAYMENT_REQUESTED: lambda session, events: seen.extend(events)}

    _upgraded_to_envelope_version_2(monkeypatch)
    assert _replayed(message_id, handlers) == Outcome.PARKED
    assert seen == []
    row = _row(message_id)
    assert row.parked_at is not None and "occurred_at" in row.last_error
    assert row.last_error == inbox_row(record)["last_error"]  # as a fresh read refuses it


def test_a_message_of_an_envelope_version_not_known_yet_under_a_taken_id_is_parked_not_dropped(
        in_payments, payments_inbox, user_id):
    """Kept as its text, a message of an envelope version this reader does not know is compared
    with the one stored under its id by the payload its text holds: another order's request under
    a taken id is parked, not dropped unsaid as a repeat."""
    stored, message_id = _request_record(user_id)
    assert payments_inbox([stored]) == [message_id]
    body = _of_envelope_version_2(user_id)[1] | {"message_id": str(message_id)}
    other = _record(encode(body))
    assert payments_inbox([other]) == []
    [parked] = _stored_at(other)
    assert parked.parked_at is not None and parked.message_id != message_id
    assert parked.raw_value == other.value.decode()
    assert "one of another payload under it is another message" in parked.last_error


def test_a_message_kept_as_its_text_is_told_from_another_under_its_id_by_the_payload_it_holds(
        in_payments, payments_inbox, user_id, monkeypatch):
    """The other way round: stored as its text (its envelope version not known then), a message
    is compared by the payload its text holds: another order's request under its id is parked,
    not dropped unsaid; the message itself, read again by a reader that knows its version now,
    is a repeat."""
    kept, body = _of_envelope_version_2(user_id)
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([kept]) == []
    other, _ = _request_record(user_id, message_id)
    assert payments_inbox([other]) == []
    _upgraded_to_envelope_version_2(monkeypatch)
    assert payments_inbox([kept]) == []
    parked = {row.offset: row for row in _stored_at(kept, other)}
    assert sorted(parked) == [kept.offset, other.offset]
    assert parked[kept.offset].message_id == message_id
    assert parked[other.offset].message_id != message_id
    assert parked[other.offset].parked_at is not None


def test_a_message_of_a_known_envelope_version_keeps_it(in_payments, payments_inbox, user_id):
    record, message_id = _request_record(user_id)
    assert payments_inbox([record]) == [message_id]
    assert _row(message_id).envelope_version == 1


def test_a_refused_payload_keeps_its_numbers_and_its_text_as_sent(in_payments, payments_inbox,
                                                                  user_id):
    """Read as the consumer reads them (a number with a point as a Decimal), they are stored as
    jsonb holds them: a Decimal is no JSON to the driver, and failed the batch's insert."""
    payload = {"fee": "__FEE__", "path": "C:\\u0000", "tags": ["a", 2, None, True]}
    record, body = _from_a_newer_producer(user_id, type="PaymentRefunded", payload=payload,
                                          as_written={"__FEE__": b"0.5"})
    good, good_id = _request_record(user_id)
    assert payments_inbox([record, good]) == [good_id]
    row = _row(uuid.UUID(body["message_id"]))
    assert row.parked_at is not None and row.raw_value is None
    assert row.payload == payload | {"fee": Decimal("0.5")}
    assert isinstance(row.payload["fee"], Decimal)  # (0.5 == Decimal("0.5") too)


def test_a_refused_payloads_decimal_amount_is_read_back_as_sent_when_replayed(
        in_payments, payments_inbox, user_id, monkeypatch):
    """An amount of 10.50 sent as a JSON number (the contract takes one) is read back as the
    Decimal it was, not a float, which the contract refuses: the replay is handled, not parked."""
    payload = _failed_payment_with_a_new_reason(user_id, amount="__AMOUNT__")
    record, body = _from_a_newer_producer(user_id, type=PAYMENT_FAILED, payload=payload,
                                          as_written={"__AMOUNT__": b"10.50"})
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == []
    handlers, seen = _replayed_once_the_reason_is_known(message_id, monkeypatch)
    with transaction() as session:
        assert process_inbox_message(session, message_id, handlers) == Outcome.PROCESSED
    assert seen[0].payload["amount"] == Decimal("10.50")


def test_a_refused_payloads_numbers_are_kept_as_long_as_they_were_sent(in_payments,
                                                                       payments_inbox, user_id):
    """Up to the edge of what numeric reads, written as they came: 1e1000 in full is a thousand
    and one digits, and a record of many such made one batch's statement larger than PostgreSQL
    takes."""
    numbers = b"[9.99e998,-1e-1000,0E-7,-0.0,12.50," + b",".join([b"1e1"] * 2000) + b"," \
        + b" " * 4000 + b"0]"  # (room in the record for the first two, printed in full)
    record, body = _from_a_newer_producer(user_id, type="PaymentRefunded", payload={"n": "__N__"},
                                          as_written={"__N__": numbers})
    assert len(inbox_row(record)["payload"].getquoted()) < 2 * len(record.value)
    good, good_id = _request_record(user_id)
    assert payments_inbox([record, good]) == [good_id]
    row = _row(uuid.UUID(body["message_id"]))
    assert row.raw_value is None and len(row.payload["n"]) == 2006


def test_a_refused_payload_printed_back_far_longer_than_it_came_is_kept_as_raw_text(
        in_payments, payments_inbox, user_id):
    """PostgreSQL prints 1e1000 back in full: a record of them, kept as jsonb, would be read back
    (by a replay, a listing) at a hundred times its size."""
    numbers = b"[" + b",".join([b"1e1000"] * 2000) + b"]"
    record, body = _from_a_newer_producer(user_id, type="PaymentRefunded", payload={"n": "__N__"},
                                          as_written={"__N__": numbers})
    assert payments_inbox([record]) == []
    (row,) = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == "test-topic", InboxMessage.offset == record.offset)).all()
    assert row.payload is None and row.raw_value


@pytest.mark.parametrize("value", [
    b'"a\\u0000b"',  # a NUL character
    b"1e1001",  # past numeric's exponents
    b"1" + b"0" * 1000,  # past its digits, here
    b"1e999999999",  # a billion characters written out
    b"[" * 900 + b"]" * 900,  # deeper than it is written out
])
def test_a_refused_payload_jsonb_cannot_hold_is_kept_as_raw_text(in_payments, payments_inbox,
                                                                 user_id, value):
    """A NUL character in it, or a number numeric cannot take, would fail the batch's insert,
    and the partition would stop there."""
    record, body = _from_a_newer_producer(user_id, type="PaymentRefunded",
                                          payload={"note": "__NOTE__"},
                                          as_written={"__NOTE__": value})
    good, good_id = _request_record(user_id)
    assert payments_inbox([record, good]) == [good_id]
    (row,) = db.session.scalars(select(InboxMessage).where(
        InboxMessage.topic == "test-topic", InboxMessage.offset == record.offset)).all()
    assert row.parked_at is not None and row.payload is None and row.raw_value
    assert row.message_id != uuid.UUID(body["message_id"])
