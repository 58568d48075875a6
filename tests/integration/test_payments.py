"""Payment decisions against real PostgreSQL: one debit per order, no lost updates."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

from sqlalchemy import func, select

from payments_app import service
from payments_app.models import Account, Payment
from shared.db import db, transaction
from shared.outbox import OutboxMessage


def _open_with(user_id: str, balance: str) -> None:
    with transaction() as session:
        service.open_account(session, user_id=user_id)
        service.deposit(session, user_id=user_id, amount=Decimal(balance))


def _balance(user_id: str) -> Decimal:
    db.session.rollback()
    return db.session.get(Account, user_id).balance


def _take(order_id, user_id, amount):
    with transaction() as session:
        return service.take_payment(session, order_id=order_id, user_id=user_id,
                                    amount=Decimal(amount), correlation_id=str(order_id))


def test_the_same_order_is_charged_once_and_answered_once(in_payments, user_id):
    _open_with(user_id, "100")
    order_id = uuid.uuid4()
    assert _take(order_id, user_id, "30") is not None
    assert _take(order_id, user_id, "30") is None
    assert _balance(user_id) == Decimal("70.00")
    results = db.session.scalar(select(func.count()).where(
        OutboxMessage.correlation_id == str(order_id)))
    assert results == 1


def test_refusals_say_why_and_change_no_balance(in_payments, user_id):
    _open_with(user_id, "10")
    poor = _take(uuid.uuid4(), user_id, "10.01")
    assert (poor.status, poor.reason) == ("FAILED", "INSUFFICIENT_FUNDS")
    nobody = _take(uuid.uuid4(), f"{user_id}-none", "1")
    assert (nobody.status, nobody.reason) == ("FAILED", "NO_ACCOUNT")
    assert _balance(user_id) == Decimal("10.00")


def test_concurrent_payments_and_deposits_never_lose_an_update_or_overdraw(
        payments_flask_app, user_id):
    with payments_flask_app.app_context():
        _open_with(user_id, "100")
    errors = []

    def pay():
        try:
            with payments_flask_app.app_context():
                _take(uuid.uuid4(), user_id, "10")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def deposit():
        try:
            with payments_flask_app.app_context():
                with transaction() as session:
                    service.deposit(session, user_id=user_id, amount=Decimal("1"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pay) for _ in range(15)]
    threads += [threading.Thread(target=deposit) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with payments_flask_app.app_context():
        succeeded = db.session.scalar(select(func.count()).where(
            Payment.user_id == user_id, Payment.status == "SUCCEEDED"))
        balance = _balance(user_id)
    assert balance >= 0
    assert balance == Decimal("105.00") - 10 * succeeded
    assert succeeded >= 10
