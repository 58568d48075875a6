"""Flower's configuration file: `celery -A tasks flower` runs flowerconfig.py from its working
directory as it starts (Flower's `--conf`, this name by default), before it serves a page; nothing
else reads it.

Flower's Broker page (and its /api/queues/length) shows the lengths of the queues the workers it
knows consume, and the app's own (task_default_queue and task_queues) only while it knows none:
a service whose workers were all down as Flower started would be missing from the page just as its
backlog grew. Flower has no option for it, so its one method that names the queues
(`BaseHandler.get_active_queue_names`) is given every queue the app declares (celeryconfig.py's
task_queues: each service's two), and any other a worker consumes.
"""

from flower.views import BaseHandler

_workers_queue_names = BaseHandler.get_active_queue_names


def _declared_and_workers_queue_names(handler: BaseHandler) -> list[str]:
    conf = handler.capp.conf
    declared = {conf.task_default_queue} | {queue.name for queue in conf.task_queues or ()}
    return sorted(declared | set(_workers_queue_names(handler)))


BaseHandler.get_active_queue_names = _declared_and_workers_queue_names
