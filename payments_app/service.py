"""Payments use cases: open an account, deposit, read the balance, and decide payment requests.

Each takes the session of a transaction its caller owns; none commits.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from flask import current_app
from psycopg2.extras import execute_values
from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from payments_app.models import FAILED, SUCCEEDED, Account, Payment
from shared.cache import invalidate_after_commit
from shared.contracts import (INSUFFICIENT_FUNDS, NO_ACCOUNT, PAYMENT_FAILED, PAYMENT_SUCCEEDED,
                              new_event)
from shared.db import driver_cursor
from shared.errors import Conflict, NotFound, Unprocessable
from shared.money import MAX_BALANCE
from shared.outbox.writing import add_outbox_message


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
    """Add money in one atomic UPDATE, so concurrent deposits and debits never lose an update; one
    that would take the balance past MAX_BALANCE (the column's limit) changes nothing."""
    if not _add_within_limit(session, user_id, amount):
        # No row matched: there is no account, or the deposit would pass the limit, or the account
        # was opened by a transaction that committed after the UPDATE began, which it did not
        # see. The row, locked and read afresh, tells which.
        account = session.get(Account, user_id, with_for_update=True, populate_existing=True)
        if account is None:
            raise NotFound("This user has no account.", code="ACCOUNT_NOT_FOUND")
        if account.balance > MAX_BALANCE - amount or not _add_within_limit(session, user_id,
                                                                             amount):
            raise Unprocessable(f"A balance cannot exceed {MAX_BALANCE}.",
                                code="BALANCE_LIMIT_EXCEEDED")
    invalidate_after_commit(session, balance_cache_namespace(user_id))
    return session.get(Account, user_id, populate_existing=True)


def _add_within_limit(session: Session, user_id: str, amount: Decimal) -> bool:
    """Whether the account's balance took `amount` without passing MAX_BALANCE."""
    return session.execute(
        update(Account)
        .where(Account.user_id == user_id, Account.balance <= MAX_BALANCE - amount)
        # (The moment of the deposit, not its transaction's start, now(): it may come before the
        # account's opening committed, and updated_at before its created_at.)
        .values(balance=Account.balance + amount, updated_at=func.clock_timestamp())
        .returning(Account.balance)
    ).first() is not None


def balance_cache_namespace(user_id: str) -> str:
    return f"balance:{user_id}"


@dataclass(frozen=True)
class PaymentRequest:
    """What a PaymentRequested event asks for, and the request id its answer carries on."""

    order_id: uuid.UUID
    user_id: str
    amount: Decimal
    request_id: str | None = None


def take_payments(session: Session, requests: list[PaymentRequest]) -> list[Payment]:
    """Decide each order's payment once, in the order asked: debit and succeed, or fail with a
    reason. Returns the new payments (detached from the session); an order already decided, under
    whatever message id, gets nothing: no second debit and no second answer.

    However many requests, three statements: lock the accounts named (in user order, so batches
    running at once never deadlock, and deposits wait their turn), insert the decisions, and debit
    each account its total. The decisions themselves are made in Python, request after request,
    each against the balance the ones before it left.

    What keeps an order to one decision is the insert, keyed by order id: a decision made twice
    goes in once, and only the decisions that went in are debited and announced. An order decided
    before (its request handled again under another message id) is decided again here, and its
    decision goes in as nothing; for a user without an account, two transactions can decide the
    same order at once, and the second's insert waits for the first's and goes in as nothing.
    (Orders decided before are not read first: that read cost every batch a statement, for a case
    the insert and the correction below settle.)

    Such a lost decision, if it was a success, was counted against the balance left for the
    user's later orders: they may have been refused for want of its amount. And one lost to a
    transaction that held no account lock was made NO_ACCOUNT by it: if the account was opened
    meanwhile, this one may have decided the same order SUCCEEDED and the user's later orders
    against a balance short by its amount. So, only when a success did not go in (one statement
    more, when a decision changes), the decisions that did go in are made again against the
    balances as locked, and the rows that change are corrected before anything is debited or
    announced: what the call would have decided without the lost ones.
    """
    if not requests:
        return []
    with driver_cursor(session) as cursor:
        cursor.execute(_LOCK_ACCOUNTS, (sorted({request.user_id for request in requests}),))
        balances: dict[str, Decimal] = dict(cursor.fetchall())
    deciding: dict[uuid.UUID, PaymentRequest] = {}  # the request each decision answers
    for request in requests:
        deciding.setdefault(request.order_id, request)
    decisions = _decide_in_turn(deciding.values(), balances)
    rows = [(str(order_id), request.user_id, request.amount, *decisions[order_id])
            for order_id, request in deciding.items()]
    with driver_cursor(session) as cursor:
        inserted = execute_values(cursor, _INSERT_PAYMENTS, rows, page_size=len(rows), fetch=True)
    decided_now = {payment.order_id: payment for payment in map(_payment_of, inserted)}
    if _lost_a_success(decisions, decided_now):
        went_in = [request for order_id, request in deciding.items() if order_id in decided_now]
        decided_now = _decided_again(session, went_in, balances, decided_now)
    payments = [decided_now[order_id] for order_id in deciding if order_id in decided_now]
    _debit(session, [payment for payment in payments if payment.status == SUCCEEDED])
    _announce_decisions(session, payments, deciding)
    return payments


def _decide_in_turn(requests: Iterable[PaymentRequest],
                    balances: dict[str, Decimal]) -> dict[uuid.UUID, tuple[str, str | None]]:
    """Each request's decision (status, reason), each against the balance that `balances` (left
    as they are) and the requests before it leave."""
    left = dict(balances)
    decisions = {}
    for request in requests:
        status, reason = _decide(left.get(request.user_id), request.amount)
        decisions[request.order_id] = (status, reason)
        if status == SUCCEEDED:
            left[request.user_id] -= request.amount
    return decisions


def _lost_a_success(decisions: dict[uuid.UUID, tuple[str, str | None]],
                    went_in: dict[uuid.UUID, Payment]) -> bool:
    """Whether a decision to debit did not go in (another transaction's decision did)."""
    return any(status == SUCCEEDED and order_id not in went_in
               for order_id, (status, _reason) in decisions.items())


def _decided_again(session: Session, went_in: list[PaymentRequest], balances: dict[str, Decimal],
                   payments: dict[uuid.UUID, Payment]) -> dict[uuid.UUID, Payment]:
    """`payments` (the decisions that went in, by order id) decided again, in turn, without the
    lost ones; those that change are corrected in the table too."""
    changed = [(str(order_id), status, reason)
               for order_id, (status, reason) in _decide_in_turn(went_in, balances).items()
               if (status, reason) != (payments[order_id].status, payments[order_id].reason)]
    if not changed:
        return payments
    order_ids, statuses, reasons = map(list, zip(*changed))
    with driver_cursor(session) as cursor:
        cursor.execute(_CORRECT_DECISIONS, {"order_ids": order_ids, "statuses": statuses,
                                            "reasons": reasons})
        corrected = {payment.order_id: payment for payment in map(_payment_of, cursor)}
    return {**payments, **corrected}


def _payment_of(row: tuple) -> Payment:
    order_id, user_id, amount, status, reason, created_at = row
    return Payment(order_id=uuid.UUID(order_id), user_id=user_id, amount=amount, status=status,
                   reason=reason, created_at=created_at)


def _decide(balance: Decimal | None, amount: Decimal) -> tuple[str, str | None]:
    if balance is None:
        return FAILED, NO_ACCOUNT
    if balance < amount:
        return FAILED, INSUFFICIENT_FUNDS
    return SUCCEEDED, None


def _debit(session: Session, payments: list[Payment]) -> None:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for payment in payments:
        totals[payment.user_id] += payment.amount
    if not totals:
        return
    with driver_cursor(session) as cursor:
        cursor.execute(_DEBIT, {"users": list(totals), "amounts": list(totals.values())})
    for user_id in totals:
        invalidate_after_commit(session, balance_cache_namespace(user_id))


def _announce_decisions(session: Session, payments: list[Payment],
                        requests: dict[uuid.UUID, PaymentRequest]) -> None:
    """A PaymentSucceeded or PaymentFailed for each decision, in the same transaction."""
    topic = current_app.extensions["hseshop.settings"].topic_payment_results
    for payment in payments:
        request = requests[payment.order_id]
        payload = {"order_id": payment.order_id, "user_id": payment.user_id,
                   "amount": payment.amount}
        event = (new_event(PAYMENT_SUCCEEDED, payload) if payment.status == SUCCEEDED
                 else new_event(PAYMENT_FAILED, payload | {"reason": payment.reason}))
        add_outbox_message(session, topic=topic, key=payment.user_id, event=event,
                           request_id=request.request_id)


# Every payment request the shop takes runs through these, so they go straight to the driver
# (shared.db.driver_cursor), each with one array parameter per column however many requests.
_LOCK_ACCOUNTS = """
SELECT user_id, balance FROM accounts WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE"""
# One row back per decision that went in (the order id is the key).
_INSERT_PAYMENTS = """
INSERT INTO payments (order_id, user_id, amount, status, reason) VALUES %s
ON CONFLICT DO NOTHING
RETURNING order_id::text, user_id, amount, status, reason, created_at"""
# Only when a decision to debit was lost, to an earlier one or another transaction's
# (take_payments).
_CORRECT_DECISIONS = """
UPDATE payments SET status = decisions.status, reason = decisions.reason
FROM unnest(%(order_ids)s::uuid[], %(statuses)s::text[], %(reasons)s::text[])
     AS decisions (order_id, status, reason)
WHERE payments.order_id = decisions.order_id
RETURNING payments.order_id::text, user_id, amount, payments.status, payments.reason, created_at"""
# updated_at is the database's clock, as created_at is (a worker's may run behind it), once the
# accounts are locked (clock_timestamp(), as a deposit's).
_DEBIT = """
UPDATE accounts SET balance = accounts.balance - debits.amount, updated_at = debited_at
FROM unnest(%(users)s::text[], %(amounts)s::numeric[]) AS debits (user_id, amount),
     clock_timestamp() AS debited_at
WHERE accounts.user_id = debits.user_id"""
