"""A task's body binds its message's request id for the rest of its run only in a run Celery's
tracer began, whose end unbinds it, however often tasks.run_request_id is imported (pure logic: the
tracer runs a task of an app of the test's own, eagerly, with and without the optimisations a
worker process installs, in the app context of a bare Flask app: a service's, built here with the
settings of no test, would be kept for the process by tasks.services)."""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from celery import Celery, Task
from celery.signals import task_postrun, task_prerun
from flask import Flask

from shared.request_context import current_request_id, request_id_bound
import tasks.run_request_id
import tasks.services
from tasks.run_request_id import bind_request_id_for_the_rest_of_the_run
from tasks.services import ServiceTask
from tests.celery_tools import worker_optimizations


@dataclass
class Retried:
    """A task whose body binds its message's id for the rest of its run, then retries; and the
    id it saw bound after binding it, at each run."""

    task: Task
    seen: list[str | None] = field(default_factory=list)


@pytest.fixture
def retried(monkeypatch) -> Retried:
    monkeypatch.setattr(tasks.services, "service_app", Flask)
    app = Celery(f"run-request-id-{uuid.uuid4().hex[:8]}", set_as_current=False)

    @app.task(name=f"retried-{uuid.uuid4().hex[:8]}", base=ServiceTask, bind=True, max_retries=0)
    def task(self, service: str) -> None:
        bind_request_id_for_the_rest_of_the_run(self, "click-of-the-message")
        made.seen.append(current_request_id())
        raise self.retry(exc=ConnectionError("ledger unavailable"), countdown=1)

    made = Retried(task)
    return made


@pytest.mark.parametrize("in_a_worker", [False, True], ids=["outside a worker", "in a worker"])
def test_a_run_the_tracer_began_has_its_messages_id_bound_until_it_ends(retried, in_a_worker):
    with request_id_bound("click-of-the-caller"):
        if in_a_worker:
            with worker_optimizations(retried.task.app):
                retried.task.apply(args=("payments",))
        else:
            retried.task.apply(args=("payments",))
        assert retried.seen == ["click-of-the-message"]
        assert current_request_id() == "click-of-the-caller"


def test_a_task_called_directly_leaves_its_callers_request_id_bound(retried):
    """Called directly (a test's call, a shell's), `retry()` raises the error again, and no run's
    end unbinds what the body bound: the message's id is not bound, the caller's stays."""
    with request_id_bound("click-of-the-caller"):
        with pytest.raises(ConnectionError):
            retried.task("payments")
        assert retried.seen == ["click-of-the-caller"]
        assert current_request_id() == "click-of-the-caller"


@pytest.fixture
def imported_again() -> Iterator[None]:
    """tasks.run_request_id run a second time, under another name (as a module run as a script or
    found by a second path is), kept alive (its handlers are connected weakly), and its
    handlers disconnected after, if they were connected."""
    spec = importlib.util.spec_from_file_location("run_request_id_again",
                                                  tasks.run_request_id.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    try:
        yield
    finally:
        task_prerun.disconnect(again._begin_the_runs_request_id)
        task_postrun.disconnect(again._end_the_runs_request_id)


def test_a_second_import_connects_the_runs_handlers_no_second_time(retried, imported_again,
                                                                    caplog):
    """Connected twice, the run's second end reset a token the first had used (a handler's
    error logged), and the caller's thread was left with no id bound."""
    with request_id_bound("click-of-the-caller"):
        retried.task.apply(args=("payments",))
        assert current_request_id() == "click-of-the-caller"
    assert [record for record in caplog.records if record.levelno >= logging.ERROR
            and "Signal handler" in record.getMessage()] == []
