"""Settling orders from payment results against real PostgreSQL: once, in order, all or nothing."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select

from orders_app import service
from orders_app.models import Order
from shared.db import db, transaction
from shared.outbox.writing import OutboxMessage


def _placed(user_id: str, count: int) -> list[uuid.UUID]:
    with transaction() as session:
        return [service.place_order(session, user_id=user_id, amount=Decimal("5.00"),
                                    description="").id for _ in range(count)]


def _statuses(order_ids) -> list[tuple[str, str | None]]:
    db.session.rollback()
    return [(order.status, order.reason) for order in (db.session.get(Order, order_id)
                                                        for order_id in order_ids)]


def test_a_batch_of_results_settles_each_order_once_and_announces_it(in_orders, user_id):
    paid, refused, paid_twice = _placed(user_id, 3)
    results = [
        service.PaymentResult(order_id=paid, user_id=user_id, succeeded=True,
                              request_id="request-paid"),
        service.PaymentResult(order_id=refused, user_id=user_id, succeeded=False,
                              reason="INSUFFICIENT_FUNDS", request_id="request-refused"),
        service.PaymentResult(order_id=paid_twice, user_id=user_id, succeeded=True),
        service.PaymentResult(order_id=paid_twice, user_id=user_id, succeeded=False,
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
    results = [service.PaymentResult(order_id=order_id, user_id=user_id, succeeded=True),
               service.PaymentResult(order_id=uuid.uuid4(), user_id=user_id, succeeded=True)]
    with pytest.raises(service.UnknownOrder):
        with transaction() as session:
            service.apply_payment_results(session, results)
    with pytest.raises(service.UnknownOrder):
        with transaction() as session:
            service.apply_payment_results(session, [service.PaymentResult(
                order_id=order_id, user_id=f"{user_id}-else", succeeded=True)])
    assert _statuses([order_id]) == [("NEW", None)]
