"""Payments use cases: open an account, deposit, read the balance, and decide a payment request.

Each takes the session of a transaction its caller owns; none commits.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal

from flask import current_app
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from payments_app.models import FAILED, SUCCEEDED, Account, Payment
from shared.cache import invalidate_after_commit
from shared.contracts import (INSUFFICIENT_FUNDS, NO_ACCOUNT, PAYMENT_FAILED, PAYMENT_SUCCEEDED,
                              new_event)
from shared.errors import Conflict, NotFound, Unprocessable
from shared.money import MAX_BALANCE
from shared.outbox import add_outbox_message


def open_account(session: Session, *, user_id: str) -> Account:
    created = session.execute(
        insert(Account).values(user_id=user_id, balance=Decimal("0.00"))
        .on_conflict_do_nothing().returning(Account.user_id)
    ).first()
    if created is None:
        raise Conflict("This user already has an account.", code="ACCOUNT_EXISTS")
    return session.get(Account, user_id)


def get_account(session: Session, *, user_id: str) -> Account:
    account = session.get(Account, user_id)
    if account is None:
        raise NotFound("This user has no account.", code="ACCOUNT_NOT_FOUND")
    return account


def deposit(session: Session, *, user_id: str, amount: Decimal) -> Account:
    """Add money in one atomic UPDATE, so concurrent deposits and debits never lose an update."""
    balance = session.execute(
        update(Account)
        .where(Account.user_id == user_id)
        .values(balance=Account.balance + amount, updated_at=func.now())
        .returning(Account.balance)
    ).scalar_one_or_none()
    if balance is None:
        raise NotFound("This user has no account.", code="ACCOUNT_NOT_FOUND")
    if balance > MAX_BALANCE:
        raise Unprocessable(f"A balance cannot exceed {MAX_BALANCE}.", code="BALANCE_LIMIT_EXCEEDED")
    invalidate_after_commit(session, balance_cache_namespace(user_id))
    return session.get(Account, user_id, populate_existing=True)


def balance_cache_namespace(user_id: str) -> str:
    return f"balance:{user_id}"


def take_payment(session: Session, *, order_id: uuid.UUID, user_id: str, amount: Decimal,
                 correlation_id: str | None) -> Payment | None:
    """Decide the payment for an order, once: debit and succeed, or fail with a reason.

    The account row is locked before the decision, so concurrent payments and deposits on it run
    one after another. The payment row, keyed by order id, is inserted before the debit: if the
    order was already decided (under another message id) the insert does nothing and nothing else
    happens. Returns the new payment (detached from the session), or None for an order already
    decided.

    Every message a shop takes runs through here, so it speaks plain SQL compiled once (the
    statements below) rather than loading and flushing ORM objects, which cost several times more.
    """
    balance = session.execute(_LOCK_ACCOUNT, {"user_id": user_id}).scalar_one_or_none()
    if balance is None:
        status, reason = FAILED, NO_ACCOUNT
    elif balance < amount:
        status, reason = FAILED, INSUFFICIENT_FUNDS
    else:
        status, reason = SUCCEEDED, None
    decided = session.execute(_INSERT_PAYMENT, {
        "order_id": order_id, "user_id": user_id, "amount": amount, "status": status,
        "reason": reason,
    }).first()
    if decided is None:
        return None
    if status == SUCCEEDED:
        session.execute(_DEBIT, {"debited_user": user_id, "debit": amount,
                                 "debited_at": datetime.now(timezone.utc)})
        invalidate_after_commit(session, balance_cache_namespace(user_id))
    payload = {"order_id": order_id, "user_id": user_id, "amount": amount}
    event = (new_event(PAYMENT_SUCCEEDED, payload, correlation_id) if status == SUCCEEDED
             else new_event(PAYMENT_FAILED, payload | {"reason": reason}, correlation_id))
    settings = current_app.extensions["hseshop.settings"]
    add_outbox_message(session, topic=settings.topic_payment_results, key=user_id, event=event)
    return Payment(**decided._mapping)


_accounts, _payments = Account.__table__, Payment.__table__
_LOCK_ACCOUNT = (select(_accounts.c.balance)
                 .where(_accounts.c.user_id == bindparam("user_id")).with_for_update())
_INSERT_PAYMENT = insert(_payments).on_conflict_do_nothing().returning(*_payments.c)
_DEBIT = (update(_accounts)
          .where(_accounts.c.user_id == bindparam("debited_user"))
          .values(balance=_accounts.c.balance - bindparam("debit"),
                  updated_at=bindparam("debited_at")))
