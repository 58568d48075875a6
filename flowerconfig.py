"""Flower's configuration file, given to `celery -A tasks flower` as `--conf` (docker-compose.yml,
devstack): Flower runs it as it starts, before it serves a page; nothing else reads it.

Flower's Broker page shows the lengths of the queues the workers it knows consume, and the app's
own (task_default_queue and task_queues) only while it knows none (its /api/queues/length would
too, but Flower without a login, as the shop runs it, answers 401 to its whole API):
a service whose workers were all down as Flower started would be missing from the page just as its
backlog grew. Flower has no option for it, so its one method that names the queues
(`BaseHandler.get_active_queue_names`) is given every shop queue (shared/task_queues.py: each
service's two), the default queue, and any other a worker consumes.

The shop's queues are named here, not declared on the app (celeryconfig's task_queues): a worker
started without -Q consumes every queue the app declares, and `celery purge` empties them.

Flower's options may be set here too, by their names (`max_tasks`).
"""

from flower.views import BaseHandler

from shared.config import SERVICES
from shared.task_queues import queues_of

# The tasks Flower keeps in memory for its Tasks page, the newest, each some 5 KB: at Flower's own
# default, 100,000, it would pass half a GB (a soak at 25 orders a second, 20 tasks a second, grew
# it by 150 MB in 25 minutes; beat alone sends some 3.6 a second, celeryconfig's relay every second
# and sweep every 5 s for each of the three services, so an idle shop gets there in 8 hours).
# 10,000 is Celery's own default: some 50 MB, some 46 minutes of an idle shop.
max_tasks = 10_000

_SHOP_QUEUES = frozenset(name for service in SERVICES for name in queues_of(service))
_workers_queue_names = BaseHandler.get_active_queue_names


def _shop_and_workers_queue_names(handler: BaseHandler) -> list[str]:
    named = _SHOP_QUEUES | {handler.capp.conf.task_default_queue}
    return sorted(named | set(_workers_queue_names(handler)))


BaseHandler.get_active_queue_names = _shop_and_workers_queue_names
