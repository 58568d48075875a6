"""The Orders service: takes orders over HTTP and gRPC and settles them from payment results over
Kafka."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings

SERVICE = "orders"


def create_app(settings: Settings | None = None, *, serves_requests: bool = True) -> Flask:
    """The service's app; one not `serves_requests` is a worker's or a tool's (shared.app)."""
    from orders_app import models  # noqa: F401  (register the tables)
    from orders_app.api import blueprint
    from shared.app import create_service_app

    return create_service_app(SERVICE, title="HseShop Orders", blueprints=[blueprint],
                              settings=settings, serves_requests=serves_requests)


def subscribed_topics(settings: Settings) -> list[str]:
    return [settings.topic_payment_results]


def message_handlers():
    from orders_app.handlers import MESSAGE_HANDLERS

    return MESSAGE_HANDLERS
