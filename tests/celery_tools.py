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


@contextmanager
def sending_to(app: Celery, url: str) -> Iterator[None]:
    """`app`'s tasks sent to the broker at `url` (a proxy to its own, say) until the block ends:
    its broker connection and producer pools made anew for that URL, as Celery makes them anew in
    a forked child (Celery._after_fork), then closed, and the app's own put back. (broker_url
    gives way to the environment's CELERY_BROKER_URL, broker_write_url does not.)"""
    own = app.conf.get("broker_write_url"), app._pool, app.amqp._producer_pool
    app.conf.broker_write_url = url
    app._pool = app.amqp._producer_pool = None
    try:
        yield
    finally:
        for made in (app.amqp._producer_pool, app._pool):
            if made is not None:
                made.force_close_all()
        app.conf.broker_write_url, app._pool, app.amqp._producer_pool = own
