"""The Orders service: takes orders over HTTP and gRPC and settles them from payment results over
Kafka."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings

SERVICE = "orders"


def create_app(settings: Settings | None = None, *,
               warns_of_published_secrets: bool = True) -> Flask:
    """The service's app; a worker's or a tool's, which serves no request, is built without
    `warns_of_published_secrets` (shared.app)."""
    from orders_app import models  # noqa: F401  (register the tables)
    from orders_app.api import blueprint
    from shared.app import create_service_app

    return create_service_app(SERVICE, title="HseShop Orders", blueprints=[blueprint],
                              settings=settings,
                              warns_of_published_secrets=warns_of_published_secrets)


def subscribed_topics(settings: Settings) -> list[str]:
    return [settings.topic_payment_results]


def published_events(settings: Settings) -> dict[str, frozenset[str]]:
    """The topics this service writes outbox rows to, each with the types of the events it
    writes there (an operator's `replay --to-topic` sends a parked row only where its type
    goes: tasks/parked.py)."""
    from shared.contracts import ORDER_STATUS_CHANGED, PAYMENT_REQUESTED

    return {settings.topic_payment_requested: frozenset({PAYMENT_REQUESTED}),
            settings.topic_order_status_changed: frozenset({ORDER_STATUS_CHANGED})}


def message_handlers():
    from orders_app.handlers import MESSAGE_HANDLERS

    return MESSAGE_HANDLERS
