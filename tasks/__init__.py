"""Background work: the Celery app, the outbox relay, inbox handling and the Kafka consumer step.

Run a worker for one service with its consumer:
    celery -A tasks worker -Q orders.control,orders -P threads --consume orders
and exactly one scheduler:
    celery -A tasks beat
"""

__all__ = ["app"]


def __getattr__(name: str):
    # The app (tasks.celery_app) is loaded as `tasks.app` is first asked for, as `celery -A tasks`
    # asks, not as the package is: `python -m tasks.parked` loads the package before its own
    # module, where Ctrl-C is taken quietly (shared.quiet_interrupt), and the app's modules are
    # half a second of loading.
    if name == "app":
        from tasks.celery_app import app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
