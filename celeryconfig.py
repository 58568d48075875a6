"""Celery configuration: Redis as the broker, two queues per service (shared/task_queues.py), and
the beat schedule that keeps a relay leading for each outbox (tasks/relay.py), sweeps the inboxes
and prunes them.

Settings only: tasks/celery_app.py reads it as it builds the Celery app, so it imports nothing from
the tasks package (which would build the app while Celery loads its config); what it shares with
the tasks is in shared/celery_settings.py."""

from datetime import timedelta

from shared.celery_settings import (ALIVE_FILE_RENEW_EVERY_SECONDS, PUBLISH_RETRY_POLICY,
                                    REDIS_TRANSPORT_PATH)
from shared.config import (REDIS_KEY_SEPARATOR, SERVICES, SERVICES_KEEPING_IDEMPOTENCY_KEYS,
                           settings_or_exit)

# (A setting a worker, beat or Flower cannot take said in a line, its password hidden, as Celery
# loads this file: not a traceback.)
_settings = settings_or_exit("celery: nothing started")

broker_url = _settings.celery_broker_url
# Kombu's Redis transport, keeping one client per channel (tasks/redis_transport.py); the app's
# connections still give the broker's URL as redis:// (tasks/celery_app.py), for Flower.
broker_transport = REDIS_TRANSPORT_PATH
broker_connection_retry_on_startup = True
# A task's publish that finds Redis refusing connections tries again for about 0.6 s (Celery's own
# policy, shared/celery_settings.py), riding out a blip, and then fails.
task_publish_retry_policy = dict(PUBLISH_RETRY_POLICY)
task_ignore_result = True
result_backend = None
# No results are kept, so none expire: beat would otherwise add its daily celery.backend_cleanup,
# sent to the default queue, which no worker reads (each one piling up there for ever).
result_expires = None

# A worker takes one task ahead for each of its threads, no more: the tasks it has taken wait in
# one line, in the order taken, so a task beat sends to the control queue (the relay's lead, a
# sweep; shared/task_queues.py) begins behind every batch taken before it, however separate its
# queue. Four to a thread (64 on 16 threads) held one up for four to five batches' time in a
# backlog, against one to two with one (a second's batches: 4.0-4.7 s against 1.1-1.8 s; 64
# handler tasks begun ahead of it against 16, as tests/integration/test_control_queue_backlog.py
# counts them). Taking fewer costs nothing measurable: a thread that ends a task finds the next
# one taken already. (Celery's worker_disable_prefetch, taking a task only for a free thread, is
# not for this transport with a pool of threads: the worker asks Redis again only at its event
# loop's next turn, and 400 one-second tasks took 44 s on 16 threads, against 26.)
worker_prefetch_multiplier = 1
task_default_queue = "default"
# The shop's queues are made as a task is first routed to each, and not declared here (task_queues):
# a worker started without -Q would consume them all, and `celery purge` empty them. Flower names
# them itself (flowerconfig.py).
task_routes = ("tasks.routing.route_to_service_queue",)
# Beat sends no task to a queue already holding a few unread (tasks/beat.py).
beat_scheduler = "tasks.beat:BoundedScheduler"
# Beat's scheduler ticks when an entry is due, and at least this often (Celery's default is every
# 5 minutes): each tick renews beat's alive file (tasks/alive.py), so its healthcheck's bound holds
# whatever the schedule's periods (the relay's every OUTBOX_RELAY_INTERVAL_SECONDS, a pruner's
# hourly).
beat_max_loop_interval = ALIVE_FILE_RENEW_EVERY_SECONDS
broker_transport_options = {
    # Redis keeps no copy of a task once a worker has taken it. A worker stopped in order (a
    # signal, `celery control shutdown`) puts those it took and had not begun back all the same,
    # at the end of their queue, as its channel closes (kombu's QoS.restore_unacked_once); one
    # killed outright (SIGKILL, the OOM killer, a crash) loses them, with those it was running,
    # and one whose Redis connection drops can too (kombu puts them back over the connection it
    # lost). What must not be lost is not the task but the work, and that is in PostgreSQL: the
    # sweeper dispatches again every inbox message left unhandled (every task is idempotent), once
    # INBOX_SWEEP_MIN_AGE_SECONDS old, but while tasks wait in the service's queue only once
    # SWEEP_MIN_AGE_WHILE_QUEUED (5 minutes) old (tasks/inbox.py); and beat sends the relay and
    # the sweeper again and again. Kombu's emulated acknowledgements cost Redis round trips on
    # every task received and on every task finished, to make good after their visibility timeout
    # (an hour) what the sweeper makes good within seconds, or minutes in a backlog.
    "ack_emulation": False,
    # Queues and event channels live under the shop's own prefix in a shared Redis.
    "global_keyprefix": f"{_settings.redis_key_prefix}{REDIS_KEY_SEPARATOR}celery:",
    # A Redis gone without closing its connections (a failover, a NAT or firewall forgetting
    # them) would hold a publish waiting for its reply for ever, by default: the inbox consumer's
    # dispatch with it, while its partitions are taken away. The reply is waited for 5 s (longer
    # than the 1 s a worker's BRPOP waits), and Celery sends the task again on a new connection;
    # should that one time out too (Redis hung: it takes connections and never answers), the
    # publish fails, within two socket timeouts, 10 s (tasks/redis_transport.py: Connection.ensure;
    # kombu connected afresh 4 times, 25.6 s). One that finds no connection pooled waits 5 s.
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
}

worker_hijack_root_logger = False
# Task events cost two Redis publishes per task, which profiling showed to outweigh the task itself.
# Flower switches them on (its --enable-events, on by default: for its Tasks page), broadcasting
# enable_events every 5 s, and never off, not even as it stops: once a Flower has run, the workers
# send them until they restart (`celery -A tasks control disable_events` stops them sooner).
worker_send_task_events = False
task_send_sent_event = False

# Idempotency keys and notifications are kept for a day or more: pruning them hourly is enough.
PRUNE_RETAINED_EVERY = timedelta(hours=1)

# Beat's tasks carry no `expires`: Celery makes it a moment on beat's clock, which each worker
# compares with its own, so with beat's host a few seconds behind the workers' (the relay's bound
# was 8 s) every relay task arrived expired and was dropped unrun, and a leader lost was never
# replaced. A stale one costs nothing: a relay run finds the leader and returns (or leads, if none
# does), a sweep or a prune finds little to do; and beat sends none to a queue already holding
# BACKLOG_LIMIT unread (tasks/beat.py), so no more than that wait for a worker coming back.
beat_schedule = {}
for _service in SERVICES:
    beat_schedule[f"relay-{_service}-outbox"] = {
        "task": "hseshop.relay_outbox",
        "schedule": timedelta(seconds=_settings.outbox_relay_interval_seconds),
        "args": (_service,),
    }
    beat_schedule[f"sweep-{_service}-inbox"] = {
        "task": "hseshop.sweep_inbox",
        "schedule": timedelta(seconds=_settings.inbox_sweep_interval_seconds),
        "args": (_service,),
    }
    beat_schedule[f"prune-{_service}-inbox"] = {
        "task": "hseshop.prune_inbox",
        "schedule": timedelta(seconds=_settings.inbox_prune_interval_seconds),
        "args": (_service,),
    }
for _service in SERVICES_KEEPING_IDEMPOTENCY_KEYS:
    beat_schedule[f"prune-{_service}-idempotency-keys"] = {
        "task": "hseshop.prune_idempotency_keys",
        "schedule": PRUNE_RETAINED_EVERY,
        "args": (_service,),
    }
beat_schedule["prune-gateway-notifications"] = {
    "task": "hseshop.prune_notifications",
    "schedule": PRUNE_RETAINED_EVERY,
    "args": ("gateway",),
}
beat_schedule["prune-gateway-signed-out-tokens"] = {
    "task": "hseshop.prune_signed_out_tokens",
    "schedule": PRUNE_RETAINED_EVERY,
    "args": ("gateway",),
}
