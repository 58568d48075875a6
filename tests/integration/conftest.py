"""Integration fixtures: both services' Flask apps on their own migrated databases, in-process.

No Celery worker runs here: tests run the relay and the handlers directly.
"""

from __future__ import annotations

import importlib
import os
import uuid

import pytest

import celeryconfig
import orders_app
import payments_app
from shared.app_closing import close_app
from shared.config import SERVICES, get_settings, load_settings
from shared.db import driver_dsn
from shared.inbox_consumer import StoreOnOwnConnection
from shared.kafka import ensure_topics
from shared.migrations import upgrade
from tasks.celery_app import app as celery_app
from tests.environment import service_env


@pytest.fixture(scope="session")
def settings(infrastructure):
    os.environ.update(service_env(infrastructure, "integration"))
    get_settings.cache_clear()
    _configure_celery_afresh()
    for service in SERVICES:
        upgrade(service)
    settings = load_settings()
    # The shop's topics, as its relays and consumers make them as they start: tests here send
    # through a publisher of their own, and the relay's producer creates no topic
    # (shared.kafka.producer_config).
    ensure_topics(settings, settings.topics())
    return settings


@pytest.fixture
def payments_inbox(settings):
    """Stores consumed records in the payments inbox as the inbox consumer does."""
    store = StoreOnOwnConnection(driver_dsn(settings.database_url("payments")))
    yield store
    store.close()


@pytest.fixture(scope="session")
def orders_flask_app(settings):
    app = orders_app.create_app(settings=settings)
    yield app
    close_app(app)


@pytest.fixture(scope="session")
def payments_flask_app(settings):
    app = payments_app.create_app(settings=settings)
    yield app
    close_app(app)


@pytest.fixture
def in_orders(orders_flask_app):
    with orders_flask_app.app_context():
        yield orders_flask_app


@pytest.fixture
def in_payments(payments_flask_app):
    with payments_flask_app.app_context():
        yield payments_flask_app


@pytest.fixture
def user_id():
    return f"user-{uuid.uuid4().hex[:12]}"


def _configure_celery_afresh() -> None:
    """This process's Celery app configured from this layer's environment: celeryconfig reads
    the settings once, as it is imported, and a test module importing it as pytest collects
    (before the environment above is set) left the app's queues under the default key prefix,
    where another run's, or `make run`'s, are."""
    importlib.reload(celeryconfig)
    celery_app.config_from_object("celeryconfig", force=True)
