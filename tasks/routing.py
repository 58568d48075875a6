"""Every HseShop task takes its service as its first argument and runs on that service's queue."""


def route_to_service_queue(name, args, kwargs, options, task=None, **kw):
    if name.startswith("hseshop.") and args:
        return {"queue": args[0]}
    return None
