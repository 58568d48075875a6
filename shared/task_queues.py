"""The Celery queues of a service, named once for the router (tasks/routing.py), for whatever
starts workers (devstack, docker-compose.yml) and for Flower's Broker page (flowerconfig.py): the
inbox's handler tasks go to `<service>`, the tasks beat sends (the relay's lead, the sweeper, the
pruners) to `<service>.control`, and each worker of the service consumes both.

Apart, so that a backlog of handler tasks holds up beat's only as long as the batches a worker has
already taken: in one queue, a relay task waited behind every batch sent before it and expired
there, and a relay leader lost during a backlog was replaced only once the backlog had drained.
Apart, a worker takes beat's task as soon as it takes another task, and begins it behind the ones
it holds: one running on each of its threads, one more prefetched for each (celeryconfig.py's
worker_prefetch_multiplier), within about two batches' time."""

from kombu.exceptions import OperationalError as KombuOperationalError
from redis import exceptions as redis_errors

# What sending a task raises when the queues' Redis cannot be reached (kombu's error once Celery's
# publish has retried, or the socket's own): the work is in PostgreSQL, so a sender that meets it
# leaves the messages to the sweeper rather than fail. (Kombu's error also stands for Redis's
# error replies, an out-of-memory Redis refusing writes, say: redis_reached tells them apart.)
QUEUES_UNREACHABLE = (KombuOperationalError, OSError)

# A connection to Redis refused, reset, timed out, or turned away (redis-py's ConnectionError
# includes its authentication and busy-loading errors).
_CONNECTION_FAILURES = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


def redis_reached(failure: BaseException) -> bool | None:
    """What a failed call to the queues' Redis (a send, a count) says of whether Redis was
    reached: False for a connection failure, True for Redis's own error reply (out of memory,
    read-only, ...), each raised as it is or as the kombu OperationalError made of it (its
    cause); None for a failure of anything else (a serialisation error, a bug: the call never
    got to Redis). A kombu OperationalError that names no cause counts as a connection's."""
    if isinstance(failure, KombuOperationalError):
        if failure.__cause__ is None:
            return False
        failure = failure.__cause__
    if isinstance(failure, _CONNECTION_FAILURES):
        return False
    if isinstance(failure, redis_errors.ResponseError):
        return True
    return None

# The tasks beat sends; every other HseShop task is an inbox handler's.
BEAT_TASKS = frozenset({"hseshop.relay_outbox", "hseshop.sweep_inbox", "hseshop.prune_inbox",
                        "hseshop.prune_idempotency_keys", "hseshop.prune_notifications",
                        "hseshop.prune_signed_out_tokens"})


def handler_queue(service: str) -> str:
    return service


def control_queue(service: str) -> str:
    return f"{service}.control"


def queues_of(service: str) -> tuple[str, str]:
    """Both queues of a service, beat's first."""
    return control_queue(service), handler_queue(service)


def worker_queues(service: str) -> str:
    """The `-Q` of a service's workers: both its queues, beat's first."""
    return ",".join(queues_of(service))
