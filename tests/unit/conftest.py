"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def in_memory_broker(monkeypatch) -> None:
    """A test's Celery apps made with broker="memory://" send to kombu's in-memory broker: Celery
    takes the environment's CELERY_BROKER_URL over the broker an app is made with, and the test
    session sets it (tests/integration/conftest.py: the session's Redis, whose `celery` queue
    other tests' sends had left tasks in, and these tests' sends would be left in)."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
