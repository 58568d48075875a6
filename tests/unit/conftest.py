"""Fixtures and hooks of the unit tests."""

from __future__ import annotations

import gc
import warnings

import pytest


@pytest.fixture
def in_memory_broker(monkeypatch) -> None:
    """A test's Celery apps made with broker="memory://" send to kombu's in-memory broker: Celery
    takes the environment's CELERY_BROKER_URL over the broker an app is made with, and the test
    session sets it (tests/integration/conftest.py: the session's Redis, whose `celery` queue
    other tests' sends had left tasks in, and these tests' sends would be left in)."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)


_garbage_of_earlier_tests_collected = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the first unit test, the garbage the tests before it left (a whole run's integration
    and end-to-end tests) is collected, what it held unclosed warned of, not failing a unit test
    (below) that a later collection would have come in."""
    global _garbage_of_earlier_tests_collected
    if not _garbage_of_earlier_tests_collected:
        gc.collect()
        _garbage_of_earlier_tests_collected = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """What a unit test leaves unclosed (a file, a child's pipe) fails it: the ResourceWarning as
    it is let go of, which in a finalizer (a file's, Popen's) is an unraisable exception pytest
    reports as a PytestUnraisableExceptionWarning. The test's body only: the session's fixtures,
    torn down after the last unit test in a whole run, are the integration and end-to-end
    tests' (and their warnings theirs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=ResourceWarning)
        warnings.filterwarnings("error", "(?s).*ResourceWarning",
                                pytest.PytestUnraisableExceptionWarning)
        return (yield)
