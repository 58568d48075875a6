"""What each service writes to its outbox is what its package's `published_events(settings)` says
it writes (an operator's `replay --to-topic` sends a parked row on only where that says its type
goes: tasks/parked.py): orders placed, one paid and one refused, each service's rows stored in the
inbox of the one that reads them, as the consumer stores them, and handled there, without Kafka."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import text

from orders_app import service as orders
from payments_app import service as payments
from shared.config import SERVICES
from shared.db import driver_dsn, transaction
from shared.inbox.storing import ConsumedRecord
from shared.inbox_consumer import StoreOnOwnConnection
from tasks.inbox import _handle_in_one_transaction
from tasks.services import service_app, service_package


def _outbox_rows(service: str, key: str) -> list:
    """The rows of `service`'s outbox under Kafka key `key`, as the relay reads them."""
    with service_app(service).app_context(), transaction() as session:
        return session.execute(text(
            "SELECT topic, key, type, envelope::text AS envelope FROM outbox_messages"
            " WHERE key = :key ORDER BY id"), {"key": key}).all()


def _delivered_to(settings, service: str, rows: list) -> None:
    """`rows`, as the relay sends them, stored in `service`'s inbox as its consumer stores them,
    and handled by its handlers, all in one batch."""
    store = StoreOnOwnConnection(driver_dsn(settings.database_url(service)))
    try:
        stored = store([ConsumedRecord(row.topic, 0, offset, row.key.encode(),
                                       row.envelope.encode(), {})
                        for offset, row in enumerate(rows)])
    finally:
        store.close()
    assert len(stored) == len(rows)
    with service_app(service).app_context():
        assert _handle_in_one_transaction(service, stored,
                                          service_package(service).message_handlers()) == []


def test_what_each_service_writes_to_its_outbox_is_what_its_published_events_says(settings,
                                                                                   user_id):
    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10.00"))
    with service_app("orders").app_context(), transaction() as session:
        for amount in ("5.00", "30.00"):  # paid, then refused for want of funds
            orders.place_order(session, user_id=user_id, amount=Decimal(amount), description="")
    _delivered_to(settings, "payments", _outbox_rows("orders", user_id))
    _delivered_to(settings, "orders", _outbox_rows("payments", user_id))
    _delivered_to(settings, "gateway", [row for row in _outbox_rows("orders", user_id)
                                        if row.topic == settings.topic_order_status_changed])

    written = {service: {(row.topic, row.type) for row in _outbox_rows(service, user_id)}
               for service in SERVICES}
    for service in SERVICES:
        published = {(topic, event_type) for topic, types in
                     service_package(service).published_events(settings).items()
                     for event_type in types}
        assert written[service] - published == set(), f"{service} writes what it does not say"
        assert published - written[service] == set(), f"{service} says what it never writes"
    # (Both outcomes decided, each order's status change written: the flow ran whole.)
    assert [row.type for row in _outbox_rows("payments", user_id)] == [
        "PaymentSucceeded", "PaymentFailed"]
    assert [row.type for row in _outbox_rows("orders", user_id)] == [
        "PaymentRequested", "PaymentRequested", "OrderStatusChanged", "OrderStatusChanged"]
