"""shared.db.transaction() under a caller's deadline (caller_waits_until): past it, the work is
rolled back, never committed, however late in the transaction the deadline passed; but for a
transaction that commits nothing new (a replay's: nothing_new_to_commit)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import psycopg2
import pytest
from sqlalchemy import text

from payments_app.models import Account
from shared.db import (CallerGaveUp, after_commit, caller_waits_until, db, driver_dsn,
                       nothing_new_to_commit, transaction)
from tests.polling import wait_for
from tests.thread_tools import OutcomeThread, all_joined


def test_work_whose_flush_waited_past_the_deadline_is_rolled_back_not_committed(
        in_payments, settings, user_id):
    """The flush of the block's pending writes waits for a row lock held elsewhere until the
    caller's deadline has passed: the transaction is rolled back (CallerGaveUp), where the
    deadline, looked at before the flush only, let it commit, and the gateway, waiting no
    longer, answered 504 for work that was done."""
    with transaction() as session:
        session.add(Account(user_id=user_id, balance=Decimal("10.00")))
    holder = psycopg2.connect(driver_dsn(settings.payments_database_url))
    deadline_passed = threading.Event()
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT 1 FROM accounts WHERE user_id = %s FOR UPDATE", (user_id,))

        def release_once_the_deadline_has_passed():
            deadline_passed.wait(10)
            holder.commit()

        releasing = OutcomeThread(release_once_the_deadline_has_passed)
        releasing.start()
        try:
            deadline = time.monotonic() + 0.5
            with pytest.raises(CallerGaveUp), caller_waits_until(deadline), \
                    transaction() as session:
                session.get(Account, user_id).balance = Decimal("99.00")
                waiting = OutcomeThread(lambda: (
                    wait_for(lambda: time.monotonic() > deadline, timeout=5,
                             what="the deadline to pass"), deadline_passed.set()))
                waiting.start()
        finally:
            deadline_passed.set()
            all_joined([releasing, waiting], 15)
    finally:
        holder.close()
    db.session.remove()
    with transaction() as session:
        assert session.get(Account, user_id).balance == Decimal("10.00")


def test_a_transaction_with_nothing_new_commits_past_the_deadline_and_new_work_does_not(
        in_payments, user_id):
    """Declared to commit nothing new (a replay, which found its answer stored), a transaction
    is committed past the caller's deadline, what is to follow its commit done. Declared so and
    then given a write of the ORM's, it is new work, rolled back; and the declaration is its
    transaction's alone: the next one, writing in SQL, is rolled back."""
    passed, done = time.monotonic() - 0.001, []
    with caller_waits_until(passed), transaction() as session:
        session.scalar(text("SELECT 1"))
        nothing_new_to_commit(session)
        after_commit(session, lambda: done.append("committed"))
    assert done == ["committed"]
    with pytest.raises(CallerGaveUp), caller_waits_until(passed), transaction() as session:
        session.scalar(text("SELECT 1"))
        nothing_new_to_commit(session)
        session.add(Account(user_id=user_id, balance=Decimal("10.00")))
    with transaction() as session:
        session.scalar(text("SELECT 1"))
        nothing_new_to_commit(session)
    with pytest.raises(CallerGaveUp), caller_waits_until(passed), transaction() as session:
        session.execute(text("INSERT INTO accounts (user_id) VALUES (:user_id)"),
                        {"user_id": user_id})
    db.session.remove()
    with transaction() as session:
        assert session.get(Account, user_id) is None
