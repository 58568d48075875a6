"""Beat's tasks and the inbox handlers' go to separate queues of their service, both of which its
workers consume (pure logic: the router and the schedule; the end-to-end tests run workers as
devstack starts them, and tests/unit/test_compose_config.py checks compose's)."""

import celeryconfig
from shared.task_queues import BEAT_TASKS
from tasks.routing import route_to_service_queue


def _queue(task: str, service: str = "orders") -> str:
    return route_to_service_queue(task, (service, ["id"]), {}, {})["queue"]


def test_beat_tasks_go_to_the_control_queue_and_handlers_to_the_service_queue():
    assert _queue("hseshop.relay_outbox") == "orders.control"
    assert _queue("hseshop.sweep_inbox", "payments") == "payments.control"
    assert _queue("hseshop.handle_inbox_batch") == "orders"
    assert _queue("hseshop.handle_inbox_message", "gateway") == "gateway"
    assert route_to_service_queue("celery.backend_cleanup", (), {}, {}) is None


def test_every_task_beat_sends_goes_to_a_control_queue():
    scheduled = {entry["task"] for entry in celeryconfig.beat_schedule.values()}
    assert scheduled <= BEAT_TASKS


def test_beat_adds_no_task_of_its_own_to_the_schedule():
    """Celery's beat adds celery.backend_cleanup, daily, when results expire and the backend does
    not expire them itself; the router leaves it to the default queue, which no worker reads."""
    from celery.beat import Scheduler

    from tasks.celery_app import app

    scheduler = Scheduler(app, lazy=True)
    scheduler.install_default_entries(scheduler.data)
    assert {entry.task for entry in scheduler.data.values()} <= BEAT_TASKS
