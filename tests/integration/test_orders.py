"""Settling orders from payment results against real PostgreSQL: once, in order, all or nothing."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from decimal import Decimal

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

import orders_app
from orders_app import service
from orders_app.handlers import on_payment_results
from orders_app.models import Order
from shared.contracts import PAYMENT_FAILED, PAYMENT_SUCCEEDED, new_event, wire_text
from shared.db import db, driver_dsn, transaction
from shared.inbox.handling import Outcome, process_inbox_message
from shared.inbox.model import InboxMessage
from shared.inbox.storing import ConsumedRecord
from shared.inbox_consumer import StoreOnOwnConnection
from shared.outbox.writing import OutboxMessage
from shared.request_context import REQUEST_ID_KAFKA_HEADER, RequestIdLogFilter
from tasks.inbox import handle_inbox_batch
from tests.clock_tools import AnHourBehind


FIVE = Decimal("5.00")  # (every order _placed's)


def _placed(user_id: str, count: int) -> list[uuid.UUID]:
    with transaction() as session:
        return [service.place_order(session, user_id=user_id, amount=FIVE,
                                    description="").id for _ in range(count)]


def _statuses(order_ids) -> list[tuple[str, str | None]]:
    db.session.rollback()
    return [(order.status, order.reason) for order in (db.session.get(Order, order_id)
                                                        for order_id in order_ids)]


def test_a_batch_of_results_settles_each_order_once_and_announces_it(in_orders, user_id):
    paid, refused, paid_twice = _placed(user_id, 3)
    results = [
        service.PaymentResult(order_id=paid, user_id=user_id, amount=FIVE, succeeded=True,
                              request_id="request-paid"),
        service.PaymentResult(order_id=refused, user_id=user_id, amount=FIVE, succeeded=False,
                              reason="INSUFFICIENT_FUNDS", request_id="request-refused"),
        service.PaymentResult(order_id=paid_twice, user_id=user_id, amount=FIVE,
                              succeeded=True),
        service.PaymentResult(order_id=paid_twice, user_id=user_id, amount=FIVE, succeeded=False,
                              reason="NO_ACCOUNT"),
    ]
    with transaction() as session:
        changed = service.apply_payment_results(session, results)
    assert [order.id for order in changed] == [paid, refused, paid_twice]
    assert _statuses([paid, refused, paid_twice]) == [
        ("FINISHED", None), ("CANCELLED", "INSUFFICIENT_FUNDS"), ("FINISHED", None)]
    announced = db.session.execute(
        select(OutboxMessage.correlation_id, OutboxMessage.envelope, OutboxMessage.request_id)
        .where(OutboxMessage.type == "OrderStatusChanged",
               OutboxMessage.correlation_id.in_([str(paid), str(refused), str(paid_twice)]))
        .order_by(OutboxMessage.id)).all()
    assert [(a.correlation_id, a.envelope["payload"]["status"], a.request_id)
            for a in announced] == [(str(paid), "FINISHED", "request-paid"),
                                    (str(refused), "CANCELLED", "request-refused"),
                                    (str(paid_twice), "FINISHED", None)]
    with transaction() as session:  # a final order never changes again
        assert service.apply_payment_results(session, results) == []
    assert _statuses([paid]) == [("FINISHED", None)]


def test_a_result_for_an_order_that_is_not_the_users_changes_nothing(in_orders, user_id):
    (order_id,) = _placed(user_id, 1)
    results = [service.PaymentResult(order_id=order_id, user_id=user_id, amount=FIVE,
                                     succeeded=True),
               service.PaymentResult(order_id=uuid.uuid4(), user_id=user_id, amount=FIVE,
                                     succeeded=True)]
    with pytest.raises(service.UnknownOrder):
        with transaction() as session:
            service.apply_payment_results(session, results)
    with pytest.raises(service.UnknownOrder):
        with transaction() as session:
            service.apply_payment_results(session, [service.PaymentResult(
                order_id=order_id, user_id=f"{user_id}-else", amount=FIVE, succeeded=True)])
    assert _statuses([order_id]) == [("NEW", None)]


@pytest.mark.parametrize("paid", [Decimal("0.01"), Decimal("50.00")])
def test_a_result_for_another_amount_than_the_orders_is_parked_and_changes_nothing(
        in_orders, settings, user_id, paid):
    """A payment of another amount does not pay the order (nor does its refusal say the order's
    own would fail): the order stays NEW, nothing is announced, the message is parked."""
    (order_id,) = _placed(user_id, 1)
    result = {"order_id": order_id, "user_id": user_id, "amount": paid}
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("orders")))
    try:  # (stored as the orders inbox consumer stores what it reads)
        stored = store([
            _result_record(new_event(PAYMENT_SUCCEEDED, result)),
            _result_record(new_event(PAYMENT_FAILED, result | {"reason": "INSUFFICIENT_FUNDS"}))])
    finally:
        store.close()
    for message_id in stored:
        with transaction() as session:
            assert process_inbox_message(session, message_id, orders_app.message_handlers()) \
                == Outcome.PARKED
        assert f"{order_id} is of 5.00, not {paid}" in \
            db.session.get(InboxMessage, message_id).last_error
    assert _statuses([order_id]) == [("NEW", None)]
    assert db.session.scalars(select(OutboxMessage.id).where(
        OutboxMessage.type == "OrderStatusChanged",
        OutboxMessage.correlation_id == str(order_id))).all() == []


@pytest.mark.parametrize("written", [5, "5.0"], ids=["a number", "one decimal"])
def test_a_result_for_the_orders_amount_written_otherwise_settles_it(in_orders, settings,
                                                                      user_id, written):
    """An amount is money, not text: a payment of 5 written `5` or `"5.0"` (not as the shop
    writes it, `"5.00"`) pays an order of 5.00, through the inbox as the consumer stores it."""
    (order_id,) = _placed(user_id, 1)
    event = new_event(PAYMENT_SUCCEEDED, {"order_id": order_id, "user_id": user_id,
                                          "amount": FIVE})
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("orders")))
    try:
        (message_id,) = store([_result_record(event, amount_written=written)])
    finally:
        store.close()
    with transaction() as session:
        assert process_inbox_message(session, message_id, orders_app.message_handlers()) \
            == Outcome.PROCESSED
    assert _statuses([order_id]) == [("FINISHED", None)]


@pytest.mark.parametrize("paid", [Decimal("5"), Decimal("5.0"), Decimal("5.000")], ids=str)
def test_a_result_of_the_orders_amount_with_other_decimals_settles_it(in_orders, user_id, paid):
    """The order's amount and the result's are compared as numbers: 5 is 5.00 however many
    decimals it is given with."""
    (order_id,) = _placed(user_id, 1)
    with transaction() as session:
        service.apply_payment_results(session, [service.PaymentResult(
            order_id=order_id, user_id=user_id, amount=paid, succeeded=True)])
    assert _statuses([order_id]) == [("FINISHED", None)]


def _succeeded(order_id: uuid.UUID, user_id: str, request_id: str) -> service.PaymentResult:
    return service.PaymentResult(order_id=order_id, user_id=user_id, amount=FIVE, succeeded=True,
                                 request_id=request_id)


def _failed(order_id: uuid.UUID, user_id: str, request_id: str,
            reason: str | None) -> service.PaymentResult:
    return service.PaymentResult(order_id=order_id, user_id=user_id, amount=FIVE, succeeded=False,
                                 reason=reason, request_id=request_id)


@pytest.fixture
def passed_over_warnings(caplog) -> Callable[[], list[tuple[str | None, str]]]:
    """The warnings orders_app.service has logged so far, each with its request id."""
    caplog.set_level(logging.WARNING, logger="orders_app.service")
    caplog.handler.addFilter(RequestIdLogFilter())
    return lambda: [(record.request_id, record.getMessage()) for record in caplog.records
                    if record.name == "orders_app.service" and record.levelname == "WARNING"]


def _passed_over(order_id: uuid.UUID, held: str, said: str) -> str:
    return (f"payment result for order {order_id} passed over: the order is already {held}, this"
            f" result says {said}")


def test_a_result_that_contradicts_a_final_order_is_passed_over_with_a_warning(
        in_orders, user_id, passed_over_warnings):
    """A result other than the one that settled an order changes nothing, and is said once, with
    the order's id, its status and reason, the result and its request id; a repeat of the
    settling result (a redelivery) is passed over without a word."""
    paid, refused = _placed(user_id, 2)
    with transaction() as session:
        service.apply_payment_results(session, [_succeeded(paid, user_id, "first-1"),
                                                _failed(refused, user_id, "first-2", "NO_ACCOUNT")])
    with transaction() as session:  # the same results, delivered again
        assert service.apply_payment_results(session, [
            _succeeded(paid, user_id, "again-1"),
            _failed(refused, user_id, "again-2", "NO_ACCOUNT")]) == []
    assert passed_over_warnings() == []
    with transaction() as session:  # other results
        assert service.apply_payment_results(session, [
            _failed(paid, user_id, "other-1", "INSUFFICIENT_FUNDS"),
            _succeeded(refused, user_id, "other-2"),
            _failed(refused, user_id, "other-3", "INSUFFICIENT_FUNDS")]) == []
    assert passed_over_warnings() == [
        ("other-1", _passed_over(paid, "FINISHED", "failed (INSUFFICIENT_FUNDS)")),
        ("other-2", _passed_over(refused, "CANCELLED (NO_ACCOUNT)", "succeeded")),
        ("other-3", _passed_over(refused, "CANCELLED (NO_ACCOUNT)",
                                 "failed (INSUFFICIENT_FUNDS)"))]
    assert _statuses([paid, refused]) == [("FINISHED", None), ("CANCELLED", "NO_ACCOUNT")]


def test_results_that_disagree_within_one_batch_are_passed_over_once_it_commits(
        in_orders, user_id, passed_over_warnings):
    """The first result of an order in a batch settles it; a later one that disagrees is passed
    over with a warning, said once the batch's transaction has committed, not before."""
    paid, refused, unexplained = _placed(user_id, 3)
    with transaction() as session:
        changed = service.apply_payment_results(session, [
            _succeeded(paid, user_id, "paid-1"),
            _failed(paid, user_id, "paid-2", "INSUFFICIENT_FUNDS"),
            _failed(refused, user_id, "refused-1", "NO_ACCOUNT"),
            _failed(refused, user_id, "refused-2", "NO_ACCOUNT"),  # (a redelivery: no word)
            _failed(refused, user_id, "refused-3", "INSUFFICIENT_FUNDS"),
            _failed(unexplained, user_id, "unexplained-1", "NO_ACCOUNT"),
            _failed(unexplained, user_id, "unexplained-2", None)])
        assert passed_over_warnings() == []
    assert [order.id for order in changed] == [paid, refused, unexplained]
    assert passed_over_warnings() == [
        ("paid-2", _passed_over(paid, "FINISHED", "failed (INSUFFICIENT_FUNDS)")),
        ("refused-3", _passed_over(refused, "CANCELLED (NO_ACCOUNT)",
                                   "failed (INSUFFICIENT_FUNDS)")),
        ("unexplained-2", _passed_over(unexplained, "CANCELLED (NO_ACCOUNT)",
                                       "failed, no reason given"))]


def test_a_result_passed_over_in_a_batch_rolled_back_and_handled_again_is_said_once(
        in_orders, settings, user_id, passed_over_warnings, monkeypatch):
    """A batch of the inbox that fails (another message's result matches no order) is rolled back
    and handled again one message at a time: a result it passed over is said once, by the run
    that committed, not by the one rolled back too, though that one had done with it (the failing
    message went to a handler of its own, in a run after it)."""
    handlers = orders_app.message_handlers()
    monkeypatch.setattr(orders_app, "message_handlers", lambda: handlers | {
        PAYMENT_FAILED: lambda session, events: on_payment_results(session, events)})
    cancelled, other = _placed(user_id, 2)
    with transaction() as session:
        service.apply_payment_results(session, [_failed(cancelled, user_id, "first",
                                                        "NO_ACCOUNT")])
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("orders")))
    try:
        message_ids = store([
            _result_record(new_event(PAYMENT_SUCCEEDED, {"order_id": cancelled,
                                                         "user_id": user_id, "amount": FIVE}),
                           request_id="passed-over"),
            _result_record(new_event(PAYMENT_FAILED, {"order_id": other, "user_id": user_id,
                                                      "amount": Decimal("0.01"),
                                                      "reason": "NO_ACCOUNT"}))])
    finally:
        store.close()
    handle_inbox_batch.apply(args=("orders", [str(message_id) for message_id in message_ids]))
    db.session.rollback()
    assert [(row.processed_at is not None, row.parked_at is not None) for row in
            (db.session.get(InboxMessage, message_id) for message_id in message_ids)] == [
        (True, False), (False, True)]
    assert passed_over_warnings() == [
        ("passed-over", _passed_over(cancelled, "CANCELLED (NO_ACCOUNT)", "succeeded"))]
    assert _statuses([cancelled, other]) == [("CANCELLED", "NO_ACCOUNT"), ("NEW", None)]


def _dividing_by_zero(session) -> None:
    session.execute(text("SELECT 1 / 0"))


def _catching_a_failed_flush(session) -> None:
    """A flush the database refuses, its error caught: SQLAlchemy rolls the savepoint back."""
    session.add(Order(id=uuid.uuid4()))  # (its user, amount and more NOT NULL)
    with suppress(IntegrityError):
        session.flush()


@pytest.mark.parametrize("failing", [_dividing_by_zero, _catching_a_failed_flush],
                         ids=["a statement's error let out", "a flush's error caught"])
def test_a_result_passed_over_by_a_try_rolled_back_to_its_savepoint_is_said_once_retried(
        in_orders, settings, user_id, passed_over_warnings, monkeypatch, failing):
    """A result's try that fails on a database error after its handler passed it over (its batch
    handled one message at a time: the message's savepoint rolled back, not the batch) says
    nothing, though the batch commits the try's count; its retry, which commits, says it once.
    (A flush's error caught left the try taken for done, undone as it was, and said.)"""
    handlers = orders_app.message_handlers()
    tries: list[uuid.UUID] = []

    def failing_its_first_try(session, events):
        on_payment_results(session, events)
        tries.extend(event.message.message_id for event in events)
        if len(tries) == 1:
            failing(session)

    monkeypatch.setattr(orders_app, "message_handlers",
                        lambda: handlers | {PAYMENT_SUCCEEDED: failing_its_first_try})
    (cancelled,) = _placed(user_id, 1)
    with transaction() as session:
        service.apply_payment_results(session, [_failed(cancelled, user_id, "first",
                                                        "NO_ACCOUNT")])
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("orders")))
    try:
        (message_id,) = store([_result_record(
            new_event(PAYMENT_SUCCEEDED, {"order_id": cancelled, "user_id": user_id,
                                          "amount": FIVE}), request_id="passed-over")])
    finally:
        store.close()
    from tasks.inbox import _handle_each_in_a_savepoint, handle_inbox_message

    assert _handle_each_in_a_savepoint("orders", [message_id],
                                       orders_app.message_handlers()) == [message_id]
    db.session.rollback()
    assert db.session.get(InboxMessage, message_id).attempts == 1  # (the batch committed)
    assert passed_over_warnings() == []
    assert handle_inbox_message.apply(args=("orders", str(message_id))).get() == "processed"
    assert tries == [message_id, message_id]
    assert passed_over_warnings() == [
        ("passed-over", _passed_over(cancelled, "CANCELLED (NO_ACCOUNT)", "succeeded"))]


def _created_and_updated(order_id: uuid.UUID) -> tuple[datetime, datetime]:
    db.session.rollback()
    order = db.session.get(Order, order_id)
    return order.created_at, order.updated_at


def test_a_settled_orders_updated_at_is_the_databases_clock_though_the_workers_runs_behind(
        in_orders, user_id, monkeypatch):
    """created_at is the database's clock: so is updated_at, whatever the worker's says."""
    (order_id,) = _placed(user_id, 1)
    monkeypatch.setattr(service, "datetime", AnHourBehind, raising=False)
    with transaction() as session:
        (settled,) = service.apply_payment_results(session, [service.PaymentResult(
            order_id=order_id, user_id=user_id, amount=FIVE, succeeded=True)])
    created_at, updated_at = _created_and_updated(order_id)
    assert created_at <= updated_at == settled.updated_at


def test_an_order_placed_after_the_settling_transaction_began_is_updated_after_it_was_created(
        in_orders, user_id):
    """updated_at is the moment the order is settled, not its transaction's start (now()): an
    order placed after a batch's transaction began, and settled in it, was not updated before it
    was created."""
    with transaction() as session:
        session.execute(text("SELECT 1"))  # (the transaction, and its now(), begin here)
        with in_orders.app_context():  # (a session of its own, which commits first)
            (order_id,) = _placed(user_id, 1)
        service.apply_payment_results(session, [service.PaymentResult(
            order_id=order_id, user_id=user_id, amount=FIVE, succeeded=True)])
    created_at, updated_at = _created_and_updated(order_id)
    assert created_at <= updated_at


_offsets = iter(range(10**9))


def _result_record(event, amount_written: object = None,
                   request_id: str | None = None) -> ConsumedRecord:
    """A payment result as the orders inbox consumer reads it from its topic (keyed by user); its
    amount written as `amount_written` is, if given, rather than as the shop writes amounts, and
    `request_id`, if given, in its header."""
    envelope = event.to_json()
    if amount_written is not None:
        envelope["payload"] = envelope["payload"] | {"amount": amount_written}
    headers = {"message_id": str(event.message_id).encode()}
    if request_id is not None:
        headers[REQUEST_ID_KAFKA_HEADER] = request_id.encode()
    return ConsumedRecord("test-payment-results", 0, next(_offsets),
                          event.payload["user_id"].encode(), wire_text(envelope).encode(), headers)
