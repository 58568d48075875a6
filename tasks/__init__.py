"""Background work: the Celery app, the outbox relay, inbox handling and the Kafka consumer step.

Run a worker for one service with its consumer:
    celery -A tasks worker -Q orders.control,orders -P threads --consume orders
and exactly one scheduler:
    celery -A tasks beat
"""

from tasks.celery_app import app

__all__ = ["app"]
