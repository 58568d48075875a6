"""A Celery task's run and the request id of its message: bound by its body for the rest of the
run, the lines Celery writes of it once the body is done included, and unbound as the run ends.

Importing this module connects the run's signal handlers (once a process: dispatch_uid)."""

from __future__ import annotations

from celery import Task
from celery.signals import task_postrun, task_prerun

from shared.request_context import bind_request_id, unbind_request_id

# Where a run's token is kept: on the tracer's request, which Task.__call__ copies into the request
# it pushes for the body outside a worker (the body may run under that one, gone by the run's end).
_RUNS_TOKEN = "hseshop_request_id_token"


def bind_request_id_for_the_rest_of_the_run(task: Task, request_id: str | None) -> None:
    """Bind `request_id` until `task`'s run ends, the lines Celery writes of it once the body is
    done included (a retry's, "Task … retry: Retry in Ns: …", written after the body raised it,
    out of reach of a `with request_id_bound`). Only in a run Celery's tracer began, which
    unbinds it as it ends: a task called directly (a test's, a shell's call) has no such run, and
    bound there the id would stay on the caller's thread. Called inside a `with
    request_id_bound(...)`, the binding is undone when that block exits."""
    if hasattr(task.request, _RUNS_TOKEN):  # (the request the body runs under, or a copy)
        bind_request_id(request_id)  # (unbound by _end_the_runs_request_id)


# A task's run begins with no request id bound, and what its body bound for the rest of it is
# unbound as it ends, after Celery's last line of it. (Each connected once a process, however
# often this module is run: twice, the second end reset a token already used, and the thread was
# left with none bound where it had had one before the run.)
@task_prerun.connect(dispatch_uid="hseshop.tasks.run_request_id.begin")
def _begin_the_runs_request_id(task, **_signal):
    setattr(task.request, _RUNS_TOKEN, bind_request_id(None))


@task_postrun.connect(dispatch_uid="hseshop.tasks.run_request_id.end")
def _end_the_runs_request_id(task, **_signal):
    token = getattr(task.request, _RUNS_TOKEN, None)
    if token is not None:
        unbind_request_id(token)
