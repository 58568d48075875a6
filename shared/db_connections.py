"""The most connections a process of the shop holds on its PostgreSQL at once, read from its
command: what docker-compose.yml's PostgreSQL is sized for (tests/unit/test_compose_config.py),
and what `make run` checks the machine's has room for (devstack.stack)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.db import POOL_MAX_CONNECTIONS
from shared.grpc_server import SERVER_THREADS

# Connections a Celery worker holds beside its pool's: its relay leader's and its inbox consumer's.
WORKER_OWN_CONNECTIONS = 2
# Those of a service's migrations: the server's, to make the database, and the migration's.
MIGRATIONS_CONNECTIONS = 2


def most_connections(command: Sequence[str]) -> int:
    """The most connections the process run by `command` (`gunicorn ...`, `celery -A tasks
    worker ...`, `python -m shared.grpc_server orders`, with or without `python -m`) holds at once:
    a pool (shared.db) per process, used by its threads, so no more than it has threads."""
    argv = list(command)
    if argv[:2] == ["python", "-m"]:
        argv = argv[2:]
    if argv[0] == "gunicorn":  # (a pool in each worker process)
        threads = int(argv[argv.index("--threads") + 1])
        return int(argv[argv.index("-w") + 1]) * min(threads, POOL_MAX_CONNECTIONS)
    if argv[:4] == ["celery", "-A", "tasks", "worker"]:
        threads = int(argv[argv.index("-c") + 1])
        return min(threads, POOL_MAX_CONNECTIONS) + WORKER_OWN_CONNECTIONS
    if argv[0] == "shared.grpc_server":
        return min(SERVER_THREADS, POOL_MAX_CONNECTIONS)
    if argv[0] == "shared.migrations":
        return MIGRATIONS_CONNECTIONS
    if argv[:4] in (["celery", "-A", "tasks", "beat"], ["celery", "-A", "tasks", "flower"]):
        return 0  # (Redis only)
    raise ValueError(f"how many database connections {' '.join(argv)!r} holds is not known")
