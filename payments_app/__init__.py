"""The Payments service: accounts over HTTP and gRPC, and payment decisions for requests over
Kafka."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings

SERVICE = "payments"


def create_app(settings: Settings | None = None, *, serves_requests: bool = True) -> Flask:
    """The service's app; one not `serves_requests` is a worker's or a tool's (shared.app)."""
    from payments_app import models  # noqa: F401  (register the tables)
    from payments_app.api import blueprint
    from shared.app import create_service_app

    return create_service_app(SERVICE, title="HseShop Payments", blueprints=[blueprint],
                              settings=settings, serves_requests=serves_requests)


def subscribed_topics(settings: Settings) -> list[str]:
    return [settings.topic_payment_requested]


def message_handlers():
    from payments_app.handlers import MESSAGE_HANDLERS

    return MESSAGE_HANDLERS
