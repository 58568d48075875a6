"""The one Celery app, configured from `celeryconfig`, with the inbox consumer, the relays' stop and
the watch over hung handler tasks as worker steps, and the alive file for a worker's healthcheck as
a consumer step (beat's scheduler, tasks/beat.py, renews its own)."""

import logging
import sys

from celery import Celery
from celery.app.amqp import AMQP
from celery.signals import after_setup_logger, worker_init
from click import Choice, Option

from shared.config import SERVICES
from shared.request_context import log_with_request_ids
from tasks import redis_transport
from tasks.alive import AliveFileStep, beat_alive_file_option, worker_alive_file_option
from tasks.hung_tasks import hung_task_seconds_option


class _AMQP(AMQP):
    # The app's broker connections name the shop's transport `redis` in their URL, so that Flower
    # reads the queue lengths (tasks/redis_transport.py).
    Connection = redis_transport.Connection


app = Celery("hseshop", amqp=_AMQP, include=["tasks.relay", "tasks.inbox", "tasks.retention"])
app.config_from_object("celeryconfig")

app.user_options["worker"].add(
    Option(
        ["--consume"],
        multiple=True,
        default=(),
        # (A name of another service refused in a usage line, before the worker starts: the
        # consumer step, made once it had, stopped it with a traceback.)
        type=Choice(SERVICES),
        help="Run the Kafka inbox consumer of this service in the worker (orders, payments or "
             "gateway).",
    )
)
app.user_options["worker"].add(worker_alive_file_option())
app.user_options["worker"].add(hung_task_seconds_option())
app.user_options["beat"].add(beat_alive_file_option())


# The worker's steps by name, as Celery names its own (celery.bootsteps.Blueprint.load_step): a
# worker loads them as it starts, this module long loaded. tasks.relay, which defines its step
# next to the relay it stops, loads this module for its app: were its step imported here, `import
# tasks.relay` first (a test, a script) would ask tasks.relay for a step it had not yet defined.
app.steps["worker"].add("tasks.consumer:InboxConsumerStep")
app.steps["worker"].add("tasks.relay:StopLeadingStep")
app.steps["worker"].add("tasks.hung_tasks:HungTaskWatchStep")
app.steps["consumer"].add(AliveFileStep)


@after_setup_logger.connect
def _set_up_worker_logging(logger, **kwargs):
    # Beat sends the relay every second and the sweeper every few, for every service: a
    # "received" and a "succeeded" line for each would bury everything else. Failures are still
    # logged at WARNING and above.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Handlers log the request id of the message they handle (bound by shared.inbox.handling).
    for handler in logger.handlers:
        log_with_request_ids(handler)


# How long a thread may hold the GIL while others wait for it (Python's default is 5 ms). A worker
# runs its consumer, its relay and its task threads in one process; with the default, a message
# waited 5 ms at a time whenever a handler thread was busy, several times per hop.
GIL_SWITCH_INTERVAL_S = 0.001


@worker_init.connect
def _switch_threads_sooner(**kwargs):
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


# The consumer's and the relay's modules load with the app, as they did before their steps were
# named above: the relay's task is then registered wherever the app is (beat sends a registered
# task with its own options; a test's worker Request finds it). Modules, no name taken from them:
# `import tasks.relay` first finds this module's app defined when it gets here.
import tasks.consumer  # noqa: E402, F401
import tasks.relay  # noqa: E402, F401
