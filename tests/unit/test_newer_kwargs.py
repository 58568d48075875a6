"""A task sent by a newer release, with keyword arguments this one's body does not take, runs with
those it takes, the others said once a process, and is retried with them (pure logic: Celery's own
tracer runs the tasks, eagerly, on an app of the test's own, with and without the optimisations a
worker process installs)."""

from __future__ import annotations

import logging
import uuid

import pytest
from celery import Celery
from celery.app.trace import build_tracer

from tasks.newer_kwargs import IgnoresNewerKwargs
from tests.celery_tools import worker_optimizations


@pytest.fixture
def app():
    return Celery(f"newer-kwargs-{uuid.uuid4().hex[:8]}", set_as_current=False)


@pytest.fixture(params=[False, True], ids=["outside a worker", "in a worker"])
def as_run(request, app):
    """Outside a worker, Task.__call__ pushes a request of its own for the body; in a worker
    process, Celery's stack protection has it run the body under the tracer's request alone."""
    if request.param:
        with worker_optimizations(app):
            yield
    else:
        yield


def _ignored_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "tasks.newer_kwargs" and record.levelno == logging.WARNING]


def test_a_retry_carrying_an_argument_of_a_newer_release_runs_with_the_arguments_it_knows(
        app, caplog):
    """As a worker of the release before `lost_under` got a batch's retry carrying it: refused
    with a TypeError then, the batch left to the sweeper."""
    @app.task(name=f"batch-{uuid.uuid4().hex[:8]}", base=IgnoresNewerKwargs, bind=True)
    def batch(self, service: str, message_ids: list[str],
              tries_lost_once_connected: int = 0) -> tuple:
        return service, message_ids, tries_lost_once_connected

    caplog.set_level(logging.INFO, logger="tasks.newer_kwargs")
    result = batch.apply(args=("payments", ["a"]),
                         kwargs={"tries_lost_once_connected": 1, "lost_under": {"a": 1},
                                 "next_one": True})
    assert result.get() == ("payments", ["a"], 1)
    (said,) = _ignored_lines(caplog)
    assert batch.name in said and "lost_under, next_one" in said


def test_the_request_a_body_runs_under_carries_the_arguments_it_takes(app, as_run):
    """`retry()` and anything else that sends the task again from its request send these."""
    @app.task(name=f"reads-{uuid.uuid4().hex[:8]}", base=IgnoresNewerKwargs, bind=True)
    def reads_its_request(self, service: str, tries: int = 0) -> dict:
        return dict(self.request.kwargs)

    result = reads_its_request.apply(args=("payments",), kwargs={"tries": 1, "lost_under": {}})
    assert result.get() == {"tries": 1}


def test_a_task_of_a_newer_release_retried_in_a_worker_is_sent_again_with_the_arguments_it_takes(
        app):
    """As in a worker (the tracer's request, not eager, under the worker's stack protection), a
    retry is sent (here, run at once: task_always_eager) with the arguments the body takes: with
    the newer release's, `apply_async` refused it with a TypeError, which `retry` turned into a
    Reject, and the retry was lost."""
    app.conf.task_always_eager = True
    runs = []

    @app.task(name=f"retried-{uuid.uuid4().hex[:8]}", base=IgnoresNewerKwargs, bind=True)
    def retried(self, service: str) -> str:
        runs.append((self.request.retries, dict(self.request.kwargs)))
        if not self.request.retries:
            raise self.retry(countdown=0)
        return service

    task_id = str(uuid.uuid4())
    with worker_optimizations(app):
        traced = build_tracer(retried.name, retried, app=app)(
            task_id, ("payments",), {"next_one": True},
            {"id": task_id, "task": retried.name, "retries": 0, "is_eager": False,
             "delivery_info": {}})
    assert traced.info is not None and traced.info.state == "RETRY", traced
    assert runs == [(0, {}), (1, {})]


def test_what_was_ignored_is_said_once_a_process_for_each_task_and_set_of_names(app, caplog):
    @app.task(name=f"sweep-{uuid.uuid4().hex[:8]}", base=IgnoresNewerKwargs)
    def sweep(service: str) -> str:
        return service

    caplog.set_level(logging.INFO, logger="tasks.newer_kwargs")
    for _ in range(3):
        assert sweep.apply(args=("orders",), kwargs={"limit": 5}).get() == "orders"
    assert sweep.apply(args=("orders",), kwargs={"limit": 5, "since": 1}).get() == "orders"
    assert sweep.apply(args=("orders",)).get() == "orders"
    assert len(_ignored_lines(caplog)) == 2


def test_a_task_body_taking_any_keyword_arguments_gets_them_all_and_nothing_is_said(app, caplog):
    @app.task(name=f"open-{uuid.uuid4().hex[:8]}", base=IgnoresNewerKwargs)
    def takes_any(service: str, **options) -> dict:
        return options

    caplog.set_level(logging.INFO, logger="tasks.newer_kwargs")
    assert takes_any.apply(args=("orders",), kwargs={"limit": 5}).get() == {"limit": 5}
    assert _ignored_lines(caplog) == []


def test_without_it_a_task_refuses_an_argument_it_does_not_take(app):
    """What a worker of a release before did (the reason for the base)."""
    @app.task(name=f"plain-{uuid.uuid4().hex[:8]}")
    def plain(service: str) -> str:
        return service

    with pytest.raises(TypeError):
        plain.apply(args=("orders",), kwargs={"limit": 5}).get()


def test_every_task_of_the_shop_ignores_newer_keyword_arguments():
    """Every task a worker of the shop runs (the inbox's, the relay's, the pruners'), so that the
    next keyword argument added to any of them does not break a rolling deploy."""
    from tasks.celery_app import app as shop

    shop.loader.import_default_modules()
    ours = {name: task for name, task in shop.tasks.items() if name.startswith("hseshop.")}
    assert {"hseshop.handle_inbox_batch", "hseshop.handle_inbox_message",
            "hseshop.sweep_inbox", "hseshop.relay_outbox"} <= ours.keys()
    assert all(isinstance(task, IgnoresNewerKwargs) for task in ours.values()), [
        name for name, task in ours.items() if not isinstance(task, IgnoresNewerKwargs)]
