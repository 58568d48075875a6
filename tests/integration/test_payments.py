"""Payment decisions against real PostgreSQL: one debit per order, no lost updates."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from decimal import Decimal

import psycopg2
import pytest
from sqlalchemy import event, func, select, text

from payments_app import service
from payments_app.models import Account, Payment
from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import db, driver_dsn, transaction
from shared.errors import NotFound
from shared.inbox.storing import ConsumedRecord
from shared.outbox.writing import OutboxMessage
from tasks.inbox import handle_inbox_batch
from tests.clock_tools import AnHourBehind
from tests.postgres_tools import second_waiting_on_the_first
from tests.thread_tools import OutcomeThread, all_joined


def _open_with(user_id: str, balance: str) -> None:
    with transaction() as session:
        service.open_account(session, user_id=user_id)
        service.deposit(session, user_id=user_id, amount=Decimal(balance))


def _balance(user_id: str) -> Decimal:
    db.session.rollback()
    return db.session.get(Account, user_id).balance


def _take(order_id, user_id, amount):
    """The new payment for the order, or None when it was already decided."""
    with transaction() as session:
        taken = service.take_payments(session, [service.PaymentRequest(
            order_id=order_id, user_id=user_id, amount=Decimal(amount))])
    return taken[0] if taken else None


def test_the_same_order_is_charged_once_and_answered_once(in_payments, user_id):
    _open_with(user_id, "100")
    order_id = uuid.uuid4()
    assert _take(order_id, user_id, "30") is not None
    assert _take(order_id, user_id, "30") is None
    assert _balance(user_id) == Decimal("70.00")
    results = db.session.scalar(select(func.count()).where(
        OutboxMessage.correlation_id == str(order_id)))
    assert results == 1


def test_an_order_of_a_user_without_an_account_decided_twice_at_once_is_answered_once(
        payments_flask_app, settings, user_id):
    """No account, no lock to wait on: both transactions decide the order, and the insert keyed
    by order id settles it, the second waiting for the first's and going in as nothing."""
    order_id = uuid.uuid4()
    taken = {}

    def first(hold):
        with payments_flask_app.app_context(), transaction() as session:
            taken["first"] = service.take_payments(session, [service.PaymentRequest(
                order_id=order_id, user_id=user_id, amount=Decimal("5"))])
            hold()

    def second():
        with payments_flask_app.app_context():
            taken["second"] = _take(order_id, user_id, "5")

    second_waiting_on_the_first(settings.database_url("payments"), first, second,
                                what="the second waiting on the first's decision")

    assert [payment.reason for payment in taken["first"]] == ["NO_ACCOUNT"]
    assert taken["second"] is None
    with payments_flask_app.app_context():
        assert db.session.scalar(select(func.count()).where(Payment.order_id == order_id)) == 1
        assert db.session.scalar(select(func.count()).where(
            OutboxMessage.correlation_id == str(order_id))) == 1


def test_a_decision_lost_to_another_transaction_takes_nothing_from_the_orders_after_it(
        payments_flask_app, settings, user_id):
    """The first transaction decides order A with no account to lock (NO_ACCOUNT) and holds
    before its commit; the account is opened meanwhile with 40. The second decides A (30), B (35)
    and C (10): against 40 less A's 30 it would refuse B and pay C, but its insert waits for the
    first's A, and A goes in as nothing. B and C are to be decided against the balance as it is:
    B pays, leaving 5, and C is refused."""
    order_a, order_b, order_c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    taken = {}

    def request(order_id, amount):
        return service.PaymentRequest(order_id=order_id, user_id=user_id, amount=Decimal(amount))

    def first(hold):
        with payments_flask_app.app_context(), transaction() as session:
            taken["first"] = service.take_payments(session, [request(order_a, "30")])
            with psycopg2.connect(driver_dsn(settings.database_url("payments"))) as opener, \
                    opener.cursor() as cursor:
                cursor.execute("INSERT INTO accounts (user_id, balance) VALUES (%s, 40)",
                               (user_id,))
            opener.close()
            hold()

    def second():
        with payments_flask_app.app_context(), transaction() as session:
            taken["second"] = service.take_payments(session, [
                request(order_a, "30"), request(order_b, "35"), request(order_c, "10")])

    second_waiting_on_the_first(settings.database_url("payments"), first, second,
                                what="the second's insert waiting on the first's decision of A")

    assert [(p.order_id, p.reason) for p in taken["first"]] == [(order_a, "NO_ACCOUNT")]
    assert [(p.order_id, p.status, p.reason) for p in taken["second"]] == [
        (order_b, "SUCCEEDED", None), (order_c, "FAILED", "INSUFFICIENT_FUNDS")]
    with payments_flask_app.app_context():
        assert _balance(user_id) == Decimal("5.00")
        decisions = db.session.execute(select(Payment.order_id, Payment.status, Payment.reason)
                                       .where(Payment.user_id == user_id)).all()
        assert sorted(decisions) == sorted([(order_a, "FAILED", "NO_ACCOUNT"),
                                            (order_b, "SUCCEEDED", None),
                                            (order_c, "FAILED", "INSUFFICIENT_FUNDS")])
        answers = db.session.execute(select(OutboxMessage.correlation_id, OutboxMessage.type)
                                     .where(OutboxMessage.correlation_id.in_(
                                         [str(order_a), str(order_b), str(order_c)]))).all()
        assert sorted(answers) == sorted([(str(order_a), "PaymentFailed"),
                                          (str(order_b), "PaymentSucceeded"),
                                          (str(order_c), "PaymentFailed")])


def test_refusals_say_why_and_change_no_balance(in_payments, user_id):
    _open_with(user_id, "10")
    poor = _take(uuid.uuid4(), user_id, "10.01")
    assert (poor.status, poor.reason) == ("FAILED", "INSUFFICIENT_FUNDS")
    nobody = _take(uuid.uuid4(), f"{user_id}-none", "1")
    assert (nobody.status, nobody.reason) == ("FAILED", "NO_ACCOUNT")
    assert _balance(user_id) == Decimal("10.00")


def test_a_deposit_racing_the_opening_of_its_account_is_taken_not_refused(in_payments, user_id,
                                                                         settings):
    """The account is opened by a transaction that commits just after the deposit's UPDATE has
    looked for it (and, under READ COMMITTED, not seen it): the deposit finds it then, and is
    taken, rather than answered with the balance limit on a balance of 0.00."""
    opener = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    with opener.cursor() as cursor:
        cursor.execute("INSERT INTO accounts (user_id, balance) VALUES (%s, 0)", (user_id,))

    def open_it_once_the_update_has_looked(conn, cursor, statement, *args) -> None:
        if statement.startswith("UPDATE accounts") and not opener.closed:
            opener.commit()
            opener.close()

    event.listen(db.engine, "after_cursor_execute", open_it_once_the_update_has_looked)
    try:
        with transaction() as session:
            service.deposit(session, user_id=user_id, amount=Decimal("5"))
    finally:
        event.remove(db.engine, "after_cursor_execute", open_it_once_the_update_has_looked)
        opener.close()
    assert _balance(user_id) == Decimal("5.00")


def _created_and_updated(user_id: str) -> tuple:
    db.session.rollback()
    account = db.session.get(Account, user_id)
    return account.created_at, account.updated_at


def test_a_debit_sets_updated_at_by_the_databases_clock_though_the_workers_runs_behind(
        in_payments, user_id, monkeypatch):
    """created_at is the database's clock: so is updated_at, whatever the worker's says."""
    _open_with(user_id, "10")
    monkeypatch.setattr(service, "datetime", AnHourBehind, raising=False)
    assert _take(uuid.uuid4(), user_id, "3") is not None
    created_at, updated_at = _created_and_updated(user_id)
    assert created_at <= updated_at


def test_a_deposit_in_a_transaction_begun_before_the_account_was_opened_is_after_it(
        in_payments, user_id):
    """updated_at is the moment of the deposit, not its transaction's start (now()): an account
    opened after that start, and given a deposit in the transaction, was not updated before it
    was created."""
    with transaction() as session:
        session.execute(text("SELECT 1"))  # (the transaction, and its now(), begin here)
        with in_payments.app_context(), transaction() as opening:  # (a session of its own)
            service.open_account(opening, user_id=user_id)
        service.deposit(session, user_id=user_id, amount=Decimal("5"))
    created_at, updated_at = _created_and_updated(user_id)
    assert created_at <= updated_at


def test_a_deposit_without_an_account_is_not_found(in_payments, user_id):
    with pytest.raises(NotFound), transaction() as session:
        service.deposit(session, user_id=user_id, amount=Decimal("5"))


def test_concurrent_payments_and_deposits_never_lose_an_update_or_overdraw(
        payments_flask_app, user_id):
    with payments_flask_app.app_context():
        _open_with(user_id, "100")

    def pay():
        with payments_flask_app.app_context():
            _take(uuid.uuid4(), user_id, "10")

    def deposit():
        with payments_flask_app.app_context():
            with transaction() as session:
                service.deposit(session, user_id=user_id, amount=Decimal("1"))

    threads = [OutcomeThread(pay) for _ in range(15)]
    threads += [OutcomeThread(deposit) for _ in range(5)]
    for t in threads:
        t.start()
    all_joined(threads, 60)
    with payments_flask_app.app_context():
        succeeded = db.session.scalar(select(func.count()).where(
            Payment.user_id == user_id, Payment.status == "SUCCEEDED"))
        balance = _balance(user_id)
    assert balance >= 0
    assert balance == Decimal("105.00") - 10 * succeeded
    assert succeeded >= 10


def test_a_batch_is_decided_request_after_request_against_the_running_balance(in_payments,
                                                                              user_id):
    other = f"{user_id}-other"
    _open_with(user_id, "25")
    _open_with(other, "5")
    requests = [service.PaymentRequest(order_id=uuid.uuid4(), user_id=user, amount=Decimal(amount),
                                       request_id=f"request-{n:04d}")
                for n, (user, amount) in enumerate([(user_id, "10"), (other, "5"),
                                                    (user_id, "20"), (user_id, "15"),
                                                    (f"{user_id}-none", "1")])]
    with transaction() as session:
        taken = service.take_payments(session, requests)
    assert [(p.order_id, p.status, p.reason) for p in taken] == [
        (requests[0].order_id, "SUCCEEDED", None),
        (requests[1].order_id, "SUCCEEDED", None),
        (requests[2].order_id, "FAILED", "INSUFFICIENT_FUNDS"),
        (requests[3].order_id, "SUCCEEDED", None),
        (requests[4].order_id, "FAILED", "NO_ACCOUNT"),
    ]
    assert (_balance(user_id), _balance(other)) == (Decimal("0.00"), Decimal("0.00"))
    order_ids = [str(request.order_id) for request in requests]
    answers = db.session.execute(
        select(OutboxMessage.correlation_id, OutboxMessage.type, OutboxMessage.request_id)
        .where(OutboxMessage.correlation_id.in_(order_ids))
        .order_by(OutboxMessage.id)).all()
    assert [(a.correlation_id, a.type, a.request_id) for a in answers] == [
        (order_ids[0], "PaymentSucceeded", "request-0000"),
        (order_ids[1], "PaymentSucceeded", "request-0001"),
        (order_ids[2], "PaymentFailed", "request-0002"),
        (order_ids[3], "PaymentSucceeded", "request-0003"),
        (order_ids[4], "PaymentFailed", "request-0004")]


class _CountingCursor:
    """A driver cursor that notes each statement it is given to run, running them all."""

    def __init__(self, cursor, sent: list[str]):
        self._cursor, self._sent = cursor, sent

    def execute(self, statement, parameters=None):
        self._sent.append(statement)
        return self._cursor.execute(statement, parameters)

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def __iter__(self):
        return iter(self._cursor)


def test_a_batch_of_new_orders_is_decided_in_three_statements(in_payments, user_id,
                                                              monkeypatch):
    """Lock the accounts, insert the decisions, debit: no read of the orders decided before."""
    _open_with(user_id, "100")
    sent: list[str] = []
    driver_cursor = service.driver_cursor

    @contextmanager
    def counting(session):
        with driver_cursor(session) as cursor:
            yield _CountingCursor(cursor, sent)

    monkeypatch.setattr(service, "driver_cursor", counting)
    requests = [service.PaymentRequest(order_id=uuid.uuid4(), user_id=user_id,
                                       amount=Decimal("10"))
                for _ in range(3)]
    with transaction() as session:
        taken = service.take_payments(session, requests)
    assert [payment.status for payment in taken] == ["SUCCEEDED"] * 3
    assert len(sent) == 3, sent
    assert _balance(user_id) == Decimal("70.00")


def test_an_order_decided_before_asked_again_takes_nothing_from_the_users_later_orders(
        in_payments, user_id):
    """Asked again ahead of a later order that the balance pays only without it: decided again
    (a success, counted against the balance), its decision goes in as nothing, and the later
    order is decided again without it, and paid."""
    _open_with(user_id, "5")
    paid_before, later = uuid.uuid4(), uuid.uuid4()
    assert _take(paid_before, user_id, "5").status == "SUCCEEDED"
    with transaction() as session:
        service.deposit(session, user_id=user_id, amount=Decimal("5"))
    requests = [service.PaymentRequest(order_id=order_id, user_id=user_id, amount=Decimal("5"))
                for order_id in (paid_before, later)]
    with transaction() as session:
        taken = service.take_payments(session, requests)
    assert [(p.order_id, p.status, p.reason) for p in taken] == [(later, "SUCCEEDED", None)]
    assert _balance(user_id) == Decimal("0.00")
    answers = db.session.execute(select(OutboxMessage.correlation_id, OutboxMessage.type).where(
        OutboxMessage.correlation_id.in_([str(paid_before), str(later)]))).all()
    assert sorted(answers) == sorted([(str(paid_before), "PaymentSucceeded"),
                                      (str(later), "PaymentSucceeded")])


def test_a_batch_charges_an_order_once_however_often_it_asks(in_payments, user_id):
    _open_with(user_id, "100")
    decided_before = uuid.uuid4()
    assert _take(decided_before, user_id, "30") is not None
    twice = uuid.uuid4()
    requests = [service.PaymentRequest(order_id=order_id, user_id=user_id, amount=Decimal("10"))
                for order_id in (decided_before, twice, twice)]
    with transaction() as session:
        taken = service.take_payments(session, requests)
    assert [p.order_id for p in taken] == [twice]
    assert _balance(user_id) == Decimal("60.00")
    answers = db.session.scalar(select(func.count()).where(
        OutboxMessage.correlation_id.in_([str(decided_before), str(twice)])))
    assert answers == 2


def _sent_by_another_producer(order_id: uuid.UUID, user_id: str, amount: str, offset: int, *,
                              correlation_id: str | None,
                              causation_id: str | None = None) -> ConsumedRecord:
    """A PaymentRequested as a producer other than the orders service may send it, with whatever
    correlation id it put there (a reader takes any string up to 100 characters, or null), read
    off the topic at `offset`."""
    body = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user_id,
                                         "amount": Decimal(amount)}).to_json()
    body |= {"correlation_id": correlation_id, "causation_id": causation_id}
    return ConsumedRecord("payments-test", 0, offset, user_id.encode(), encode(body), {})


def test_each_result_names_its_order_whatever_correlation_id_its_request_came_with(
        in_payments, payments_inbox, user_id):
    """The contract: every event's `correlation_id` is its order id. Requests with none, another
    producer's own id or another order's id, handled by the payments handler as the inbox hands
    them over, are answered (paid, refused for lack of funds, refused for lack of an account)
    each under its own order's id, the click's id carried on as `causation_id` as ever; the
    paid order asked again under another id is not answered again."""
    _open_with(user_id, "5")
    nobody = f"{user_id}-none"
    paid, refused, no_account = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    click = f"click-{uuid.uuid4().hex}"
    handled = payments_inbox([
        _sent_by_another_producer(paid, user_id, "3", 0, correlation_id=None, causation_id=click),
        _sent_by_another_producer(refused, user_id, "4", 1, correlation_id="another-producers"),
        _sent_by_another_producer(no_account, nobody, "1", 2, correlation_id=str(paid))])
    assert handle_inbox_batch.apply(args=("payments", list(map(str, handled)))).get() == 3
    (again,) = payments_inbox([_sent_by_another_producer(paid, user_id, "3", 3,
                                                         correlation_id="replayed")])
    assert handle_inbox_batch.apply(args=("payments", [str(again)])).get() == 1

    db.session.rollback()
    answers = db.session.execute(
        select(OutboxMessage.type, OutboxMessage.correlation_id, OutboxMessage.envelope,
               OutboxMessage.request_id)
        .where(OutboxMessage.key.in_([user_id, nobody])).order_by(OutboxMessage.id)).all()
    assert [(a.type, a.envelope["payload"]["order_id"], a.correlation_id,
             a.envelope["correlation_id"], a.request_id, a.envelope["causation_id"])
            for a in answers] == [
        ("PaymentSucceeded", str(paid), str(paid), str(paid), click, click),
        ("PaymentFailed", str(refused), str(refused), str(refused), None, None),
        ("PaymentFailed", str(no_account), str(no_account), str(no_account), None, None)]
    assert _balance(user_id) == Decimal("2.00")
