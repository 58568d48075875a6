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

# What a call to Celery's queues does when it finds Redis away: it connects once more, at once (the
# connection it had may be one Redis closed as it restarted), and fails if that is refused too, in
# milliseconds. Taken by each task's publish (celeryconfig.py: task_publish_retry_policy) and by a
# count of a queue's tasks (tasks.inbox.tasks_waiting). Kombu's own would wait: Celery's publish
# tries three times more over 0.6 s, and a connection made afresh (kombu's `default_channel`) tries
# for broker_connection_timeout's 4 s, 2 s and then 4 s apart. That held the inbox consumer 0.6 s
# for every batch it stored, and beat 6.6 s for every entry that came due, while Redis refused
# connections; what a call given up on leaves undone is done again soon anyway (the sweeper
# dispatches what was stored, beat sends again what it could not, tasks/beat.py).
BROKER_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0}
