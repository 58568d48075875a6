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
