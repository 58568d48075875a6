"""Session fixtures: the real PostgreSQL, Redis and Kafka-protocol broker the tests talk to.

Nothing here skips: if a service cannot be reached or started, the fixture raises and every test
that needs it fails. What the session starts is written down in its folder, for the next session
to stop should this one be killed outright (tests/session_folders.py).
"""

from __future__ import annotations

import os
import sys

# gRPC's fork support off in this process, as gRPC is first imported (it reads the setting then):
# with it on, gRPC's pthread_atfork handler restarts its threads (pollers, thread pool) in every
# child forked here; start_child's children are forked, to run its preexec_fn, and then close
# every file but their pipes before they exec, the poller's epoll among them: a poller thread
# waiting on it then found it gone ("epoll_wait error: Bad file descriptor") and aborted the child
# before it could exec (a reaper of tests/unit/test_session_folders.py never said "ready" in a
# full run, whose integration tests had started gRPC). Nothing here forks to go on without exec
# using gRPC. The children get the setting they had: the shop's own processes run with theirs.
if "grpc" in sys.modules:
    raise RuntimeError("gRPC was imported before tests/conftest.py could turn its fork support off")
_FORK_SUPPORT_GIVEN = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
import grpc  # noqa: F401  (the setting is read as it is imported)

if _FORK_SUPPORT_GIVEN is None:
    del os.environ["GRPC_ENABLE_FORK_SUPPORT"]
else:
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = _FORK_SUPPORT_GIVEN

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

import shared.app
from devstack.infra import (ensure_postgres, ensure_redis, forget_redis_keys, free_port,
                            start_broker)
from devstack.leftovers import RunRecord
from devstack.processes import ManagedProcess
from shared.app_closing import close_app
from tests.environment import REDIS_DB, REDIS_KEYS_OF_THE_RUN, RUN_ID, Infrastructure
from tests.session_folders import begin_session
from tests.signals_end_the_run import pytest_configure  # noqa: F401  (a hook: pytest finds it here)
from tests.signed_requests import use_gateway_signed_clients


@pytest.fixture(scope="session", autouse=True)
def gateway_signed_test_clients() -> None:
    """A test calls a service as the gateway would with `client.get(path, signed_as=user_id)`."""
    use_gateway_signed_clients()


@pytest.fixture(autouse=True)
def apps_made_are_closed() -> Iterator[None]:
    """Every app a test builds (each service's create_app builds it with
    shared.app.create_service_app) is closed once the test is over (shared.app_closing): its
    pooled database connections and Redis clients would otherwise stay open until the garbage
    collector came upon the app. (The session's and a module's apps are built before this
    fixture, which runs after the fixtures of wider scope, and are closed by their own; a
    service's worker app, which tasks.services keeps for the process once a test has built it, is
    left open for the tests after it, as a worker's lives as long as the worker: closed, its
    cache would no longer retry the bumps it failed to make.)"""
    made = []
    build = shared.app.create_service_app

    def built_and_kept(*args, **kwargs):
        app = build(*args, **kwargs)
        made.append(app)
        return app

    shared.app.create_service_app = built_and_kept
    try:
        yield
    finally:
        shared.app.create_service_app = build
        for app in made:
            if not _kept_for_the_process(app):
                close_app(app)


def _kept_for_the_process(app) -> bool:
    services = sys.modules.get("tasks.services")  # (not imported: no worker app was built)
    return services is not None and services.kept_for_the_process(app)


@pytest.fixture(scope="session")
def session_record() -> Iterator[RunRecord]:
    """The record of the servers the session starts, in the session's folder (its parent), which
    a session killed outright leaves for the next to stop (tests/session_folders.py)."""
    record = begin_session()
    yield record
    record.end()  # (after the servers have stopped: the fixtures that start them use it)


@pytest.fixture(scope="session")
def note_started(session_record) -> Callable[[ManagedProcess], None]:
    """An `on_start` (devstack.infra's) that notes a server started in the session's record: a
    test starting a server of its own passes it, for the server to be stopped by the next session
    should this one be killed outright."""
    def note(process: ManagedProcess) -> None:
        session_record.note(process.pid, process.stop_signal, process.name)

    return note


@pytest.fixture(scope="session")
def run_dir(session_record) -> Path:
    """The session's run folder (logs; each stack's own, with its record of its processes)."""
    folder = session_record.path.parent / f"hseshop-{RUN_ID}"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def postgres_dir(session_record) -> Iterator[Path]:
    """Where an embedded PostgreSQL of the run keeps its data, should the run start one: out of
    pytest's temporary root (see _a_folder_another_user_can_enter), removed after use."""
    folder = session_record.path.parent / "postgres"
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A folder for a test's own embedded PostgreSQL: see _a_folder_another_user_can_enter."""
    yield from _a_folder_another_user_can_enter()


@pytest.fixture(scope="module")
def module_server_dir() -> Iterator[Path]:
    """As server_dir, for a server a whole test module shares."""
    yield from _a_folder_another_user_can_enter()


def _a_folder_another_user_can_enter() -> Iterator[Path]:
    """A new folder outside pytest's temporary root, removed after use (its server stopped).

    Started as root, an embedded PostgreSQL runs as a user of its own, which must be let through
    every folder above its data (devstack.infra). pytest keeps its root (/tmp/pytest-of-root)
    private, and makes it so again as any run starts: a second run started meanwhile, on the same
    machine, would lock the server out of its own files, and its next write fail."""
    folder = Path(tempfile.mkdtemp(prefix=f"hseshop-{RUN_ID}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def infrastructure(run_dir, postgres_dir, note_started):
    postgres_base, postgres = ensure_postgres(postgres_dir, on_start=note_started)
    redis_server = None
    try:
        redis_url, redis_server = ensure_redis(run_dir, on_start=note_started)
        broker_port = free_port()
        broker = start_broker(broker_port, run_dir, on_start=note_started)
    except BaseException:  # the servers started before it go too, not left running
        _stop_started(redis_server, postgres)
        raise
    redis_parts = urlsplit(redis_url)
    infra = Infrastructure(
        postgres_base=postgres_base,
        redis_base=f"{redis_parts.scheme}://{redis_parts.netloc}",
        broker_port=broker_port,
    )
    yield infra
    try:
        broker.stop()
        _drop_test_databases(postgres_base)
        for db_number in set(REDIS_DB.values()):
            forget_redis_keys(f"{infra.redis_base}/{db_number}", REDIS_KEYS_OF_THE_RUN)
    finally:  # the servers this run started go, whatever failed before
        _stop_started(redis_server, postgres)


def _stop_started(*processes) -> None:
    """Stop the servers this run started (None: one it found running, or never started)."""
    for process in processes:
        if process is not None:
            process.stop()


def _drop_test_databases(postgres_base: str) -> None:
    engine = sa.create_engine(f"{postgres_base.replace('postgresql://', 'postgresql+psycopg2://')}"
                              "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        names = conn.scalars(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                             {"p": f"hseshop_test_{RUN_ID}_%"}).all()
        for name in names:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
