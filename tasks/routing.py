"""Every HseShop task takes its service as its first argument and runs on a queue of that
service's (shared/task_queues.py): beat's tasks on its control queue, the handlers' on the other."""

from shared.task_queues import BEAT_TASKS, control_queue, handler_queue


def route_to_service_queue(name, args, kwargs, options, task=None, **kw):
    if name.startswith("hseshop.") and args:
        service = args[0]
        return {"queue": control_queue(service) if name in BEAT_TASKS else handler_queue(service)}
    return None
