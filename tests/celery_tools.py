"""Celery as a worker process runs it, for tests that run tasks in the test's own process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery, _state
from celery.app.trace import reset_worker_optimizations, setup_worker_optimizations


@contextmanager
def worker_optimizations(app: Celery) -> Iterator[None]:
    """The optimisations every worker process installs (`celery worker`, any pool, and each
    prefork child: celery.app.trace.setup_worker_optimizations), among them the stack protection
    under which a task's own `__call__` that calls Task.__call__ runs the body with no request
    pushed but the tracer's; then taken off again, as Celery's own tests do
    (reset_worker_optimizations), and the current and default apps, which setting them up
    replaces, put back."""
    current, default = _state._tls.current_app, _state.default_app
    setup_worker_optimizations(app)
    try:
        yield
    finally:
        reset_worker_optimizations(app)
        _state._set_current_app(current)
        _state.set_default_app(default)
