"""The Payments service: accounts over HTTP and gRPC, and payment decisions for requests over
Kafka."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings

SERVICE = "payments"


def create_app(settings: Settings | None = None, *,
               warns_of_published_secrets: bool = True) -> Flask:
    """The service's app; a worker's or a tool's, which serves no request, is built without
    `warns_of_published_secrets` (shared.app)."""
    from payments_app import models  # noqa: F401  (register the tables)
    from payments_app.api import blueprint
    from shared.app import create_service_app

    return create_service_app(SERVICE, title="HseShop Payments", blueprints=[blueprint],
                              settings=settings,
                              warns_of_published_secrets=warns_of_published_secrets)


def subscribed_topics(settings: Settings) -> list[str]:
    return [settings.topic_payment_requested]


def published_events(settings: Settings) -> dict[str, frozenset[str]]:
    """The topics this service writes outbox rows to, each with the types of the events it
    writes there (an operator's `replay --to-topic` sends a parked row only where its type
    goes: tasks/parked.py)."""
    from shared.contracts import PAYMENT_FAILED, PAYMENT_SUCCEEDED

    return {settings.topic_payment_results: frozenset({PAYMENT_SUCCEEDED, PAYMENT_FAILED})}


def message_handlers():
    from payments_app.handlers import MESSAGE_HANDLERS

    return MESSAGE_HANDLERS
