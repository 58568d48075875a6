"""Where tasks find a service: its package, its Flask app (one per process), its handlers, and a
task base class that runs each task inside the app context of the service it names (and, as
IgnoresNewerKwargs, drops the keyword arguments a newer release sends that it does not take), and
can bind a request id for the rest of a task's run."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from celery.signals import task_postrun, task_prerun
from flask import Flask

from shared.config import SERVICES
from shared.request_context import bind_request_id, unbind_request_id
from tasks.newer_kwargs import IgnoresNewerKwargs

_apps: dict[str, Flask] = {}
_apps_lock = threading.Lock()


def service_package(service: str) -> ModuleType:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    return importlib.import_module(f"{service}_app")


def service_app(service: str) -> Flask:
    """The service's Flask app as workers and the operator's commands use it, for its app
    context only, built on first use in this process. It serves no request, so signs and verifies
    nothing: no warning of a published secret from a process that does not use it."""
    with _apps_lock:
        if service not in _apps:
            _apps[service] = service_package(service).create_app(warns_of_published_secrets=False)
        return _apps[service]


class ServiceTask(IgnoresNewerKwargs):
    """Runs the task body inside the app context of the service named by its first argument; a
    keyword argument the body does not take (sent by a newer release) is dropped and said."""

    abstract = True

    def __call__(self, service: str, *args, **kwargs):
        with service_app(service).app_context():
            return super().__call__(service, *args, **kwargs)

    def bind_request_id_for_the_rest_of_the_run(self, request_id: str | None) -> None:
        """Bind `request_id` until the task's run ends, the lines Celery writes of it once the
        body is done included (a retry's, "Task … retry: Retry in Ns: …", written after the body
        raised it, out of reach of a `with request_id_bound`). Only in a run Celery's tracer
        began, which unbinds it as it ends: a task called directly (a test's, a shell's call) has
        no such run, and bound there the id would stay on the caller's thread."""
        if hasattr(self.request, _RUNS_TOKEN):  # (the request the body runs under, or a copy)
            bind_request_id(request_id)  # (unbound by _end_the_runs_request_id)


# Where a run's token is kept: on the tracer's request, which Task.__call__ copies into the request
# it pushes for the body outside a worker (the body may run under that one, gone by the run's end).
_RUNS_TOKEN = "hseshop_request_id_token"


# A task's run begins with no request id bound, and what its body bound for the rest of it is
# unbound as it ends, after Celery's last line of it. (Each connected once a process, however
# often this module is run: twice, the second end reset a token already used, and the thread was
# left with none bound where it had had one before the run.)
@task_prerun.connect(dispatch_uid="hseshop.tasks.services.begin_the_runs_request_id")
def _begin_the_runs_request_id(task, **_signal):
    setattr(task.request, _RUNS_TOKEN, bind_request_id(None))


@task_postrun.connect(dispatch_uid="hseshop.tasks.services.end_the_runs_request_id")
def _end_the_runs_request_id(task, **_signal):
    token = getattr(task.request, _RUNS_TOKEN, None)
    if token is not None:
        unbind_request_id(token)
