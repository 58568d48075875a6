"""A task base that runs a task sent by a newer release: keyword arguments its body does not take
are dropped, and said once a process, instead of refusing the task with a TypeError.

During a rolling deploy a worker of the release before runs the tasks (and the retries) that the
new release's workers and beat send. A keyword argument a new release adds to a task (as
`handle_inbox_batch` got `tries_lost_once_connected`, then `lost_under`) made such a worker fail
the task on its arguments: a batch's retry was then lost, left to the sweeper. Ignored, the task
runs as this release runs it (a batch's retry, say, as one counting no loss yet), and a retry of
it is sent with the arguments this release takes. So a keyword argument added to a task must be
one a release before may ignore; one it may not ignore needs a task of a new name."""

from __future__ import annotations

import functools
import inspect
import logging
import threading

from celery import Task

log = logging.getLogger(__name__)

_said: set[tuple[str, frozenset[str]]] = set()  # (task, arguments) said ignored in this process
_said_lock = threading.Lock()


class IgnoresNewerKwargs(Task):
    """Runs the task body with the keyword arguments it takes, under a request that carries those
    alone, and drops the rest, saying which (a WARNING, once a process for each task and set of
    names). A body that takes **kwargs gets them all."""

    abstract = True

    def __call__(self, *args, **kwargs):
        taken = _keywords_taken(self.run)
        if taken is not None and not kwargs.keys() <= taken:
            _say_ignored(self.name, kwargs.keys() - taken)
            sent, kwargs = kwargs, {name: value for name, value in kwargs.items() if name in taken}
            _request_given(self, sent, kwargs)
        return super().__call__(*args, **kwargs)


def _request_given(task: Task, sent: dict, taken: dict) -> None:
    """Have the request the body runs under carry the arguments it takes: `retry()` sends the task
    again with its request's, and with one the body does not take, `apply_async` raised a
    TypeError, which `retry` turned into a Reject (not requeued): the retry was lost. In a worker
    process Celery's stack protection (celery.app.trace.setup_worker_optimizations) runs the body
    from Task.__call__ under the tracer's request, carrying the arguments as sent; only outside
    one does Task.__call__ push a request of its own. The request of another call (a task calling
    itself directly in its body) carries other arguments, and is left alone."""
    request = task.request_stack.top
    if request is not None and request.kwargs == sent:
        request.kwargs = taken


@functools.cache  # (a task's body, one a task: read once a process, not at every run)
def _keywords_taken(run) -> frozenset[str] | None:
    """The keyword arguments `run` takes by name, or None if it takes any (**kwargs)."""
    parameters = inspect.signature(run).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return frozenset(parameter.name for parameter in parameters
                     if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           inspect.Parameter.KEYWORD_ONLY))


def _say_ignored(task: str, names) -> None:
    said = (task, frozenset(names))
    with _said_lock:
        if said in _said:
            return
        _said.add(said)
    log.warning("%s: ignored keyword arguments this release does not take: %s (sent by a newer"
                " release, as in a rolling deploy; said once)", task, ", ".join(sorted(names)))
