"""What celeryconfig.py and the tasks package both read, kept out of the tasks package: importing
the tasks' modules builds the Celery app (tasks.celery_app, which they import; `tasks.app` too), and
the app reads celeryconfig as it is built, so celeryconfig taking these from `tasks` built the app
while Celery loaded its config. This module imports nothing."""

# Kombu's Redis transport as the shop extends it (tasks/redis_transport.py), by the path Celery's
# `broker_transport` takes: it is imported only once Celery connects to its broker.
REDIS_TRANSPORT_PATH = "tasks.redis_transport:Transport"

# How often a worker's event loop and beat's scheduler renew their alive file (tasks/alive.py):
# beat's scheduler ticks at least this often (celeryconfig.py: beat_max_loop_interval).
ALIVE_FILE_RENEW_EVERY_SECONDS = 5.0

# How a task's publish rides out Redis refusing connections for a moment (a restart, a failover):
# Celery's own policy, named here (celeryconfig.py: task_publish_retry_policy). It connects again at
# once, then 0.2 s and 0.4 s later, and gives up about 0.6 s after it was first refused. Every task
# is sent so: the inbox consumer's dispatch, a worker's retry of its task (a retry whose publish
# fails Celery drops, Reject, and its message is left to the sweeper), beat's entries. Failing
# faster cost more than it saved: a retry dropped in a blip of a few hundred milliseconds left its
# message to the sweeper, which takes it only once it is SWEEP_MIN_AGE_WHILE_QUEUED (5 minutes) old
# while tasks wait in its queue (tasks/inbox.py). Its tries are for refusals, each costing
# milliseconds: a publish's tries end at the second that times out (Redis taking connections and
# never answering: each try a socket timeout), tasks/redis_transport.py's Connection.ensure.
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 1}

# How a count of a queue's tasks (tasks.inbox.tasks_waiting) that finds Redis away connects: once
# more, at once (the connection it had may be one Redis closed as it restarted), failing if that is
# refused too, within milliseconds. Kombu's `default_channel`, connecting afresh, tried for
# broker_connection_timeout's 4 s, 2 s and then 4 s apart (on a connection a publish has used, as
# PUBLISH_RETRY_POLICY says: kombu's publish leaves its policy in the connection's options): beat
# counts a queue before each entry it sends (tasks/beat.py), and spent 6 s on each entry due while
# Redis refused connections. Nothing is lost by failing: a count that fails leaves the send to find
# out.
QUEUE_COUNT_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0,
                            "interval_max": 0}
