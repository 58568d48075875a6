"""The chaos soak's PostgreSQL restart (bench/chaos/disruptions.py): the stack's own PostgreSQL is
crashed (its postmaster and every backend SIGKILLed, a busy one too) and started again on its port
and data directory after a pause drawn from the disruptor's generator, what was committed kept,
its clients' old connections broken, answering as itself before the next disruption; one killed
for good leaves no shared memory once its data is forgotten. What its restart does as Redis's does
(never another PostgreSQL taken for it, a stack's leaving nothing running, ...) is
test_chaos_own_server_restart.py's."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import psycopg2
import pytest

from bench.chaos.disruptions import Disruptor, kill_with_its_children
from bench.chaos.plan import POSTGRES_RESTART, ChaosPlan
from devstack.infra import (free_port, postgres_process_id, start_embedded_postgres,
                            wait_until)
from devstack.postgres_data import forget_postgres_data
from devstack.postmaster_lock import (PostmasterLock, attached_by_segment,
                                      remove_shared_memory_left)
from devstack.processes import ProcessGroup
from devstack.stack import Stack
from tests.process_tools import gone

PLAN = ChaosPlan(seed=7, postgres_down_seconds=(0.1, 0.3))


def _restarting_postgres(folder, say=lambda message: None):
    """A Disruptor of a PostgreSQL of its own, on the server's group; its URL and its process."""
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_postgres(folder, free_port())
    group.add(server)
    disruptor = Disruptor(PLAN, {"postgres": server}, group.start_again, lambda rng: 0, say,
                          own_urls={"postgres": url})
    return disruptor, group, url, server


def test_postgres_crashed_comes_back_on_its_port_with_what_was_committed(server_dir):
    said: list[str] = []
    disruptor, group, url, server = _restarting_postgres(server_dir, say=said.append)
    try:
        client = psycopg2.connect(f"{url}/postgres")
        with client, client.cursor() as cursor:
            cursor.execute("CREATE TABLE committed (n int); INSERT INTO committed VALUES (42)")
        first_pid = server.pid
        assert postgres_process_id(url) == first_pid
        before = time.monotonic()
        assert disruptor._disrupt(POSTGRES_RESTART)
        after = time.monotonic()
        assert server.pid != first_pid and server.alive()
        [(killed, back)] = disruptor.outages["postgres"]  # (the invariants' excuse's window)
        assert before <= killed < back <= after
        assert postgres_process_id(url) == server.pid  # (answering already, as it returns)
        with pytest.raises(psycopg2.OperationalError):  # (its old connection broken)
            client.cursor().execute("SELECT 1")
        client.close()
        again = psycopg2.connect(f"{url}/postgres")
        with again, again.cursor() as cursor:
            cursor.execute("SELECT n FROM committed")
            assert cursor.fetchall() == [(42,)]
        again.close()
    finally:
        group.stop_all()
    assert said == ["SIGKILL postgres", f"postgres started again on {url}, recovered, answering"]
    log = server.log_path.read_text()
    assert "database system was interrupted" in log  # (a crash's recovery, not a clean start)
    drawn = random.Random(f"disruptions-{PLAN.seed}")
    drawn.uniform(*PLAN.postgres_down_seconds)  # the pause: the one draw it takes
    assert disruptor.rng.getstate() == drawn.getstate()


def test_a_busy_backend_is_killed_with_its_postmaster_and_postgres_comes_back(server_dir):
    """Each backend is its own session's leader, out of its postmaster's group's reach: a busy one
    (its query never looking whether the postmaster lives) outlived the postmaster killed alone,
    and the server started again exited, its shared memory "still in use"."""
    disruptor, group, url, server = _restarting_postgres(server_dir)
    busy = psycopg2.connect(f"{url}/postgres")
    backend = busy.get_backend_pid()
    failed: list[BaseException] = []

    def count_for_ever() -> None:
        try:
            with busy.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM generate_series(1, 3e9)")
        except psycopg2.Error as exc:
            failed.append(exc)
    query = threading.Thread(target=count_for_ever)
    query.start()
    try:
        wait_until(lambda: _state_of(url, backend) == "active", 10, what="the query to run")
        assert disruptor._disrupt(POSTGRES_RESTART)
        assert gone(backend)
        assert postgres_process_id(url) == server.pid
        query.join(10)
        assert isinstance(failed[0], psycopg2.OperationalError)  # (its connection broken)
    finally:
        group.stop_all()
        if not gone(backend):  # (outlived its postmaster: no server left to end it)
            os.kill(backend, signal.SIGKILL)
        query.join(10)
        busy.close()
        wait_until(lambda: gone(backend), 10, what="the backend to end")
        remove_shared_memory_left(server_dir / "postgres")


def _state_of(url: str, backend: int) -> str | None:
    """pg_stat_activity's state of `backend` on the PostgreSQL at `url`."""
    connection = psycopg2.connect(f"{url}/postgres")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,))
            row = cursor.fetchone()
        return None if row is None else row[0]
    finally:
        connection.close()


def test_the_data_of_a_postgres_killed_for_good_goes_with_the_shared_memory_it_left(server_dir):
    """A server killed and never started again (Ctrl-C in the soak's down window, a restart that
    failed) leaves its System V segment, which only a server started on its folder would
    remove: deleted with the folder, it stayed for as long as the machine ran."""
    url, server = start_embedded_postgres(server_dir, free_port())
    segment = PostmasterLock.read(server_dir / "postgres").shared_memory
    try:
        kill_with_its_children(server)
        assert attached_by_segment()[segment] == 0
        forget_postgres_data(server_dir / "postgres")
    finally:
        server.stop()
    assert segment not in attached_by_segment()
    assert not (server_dir / "postgres").exists()


def test_a_folder_a_killed_soak_left_goes_at_the_next_start_and_one_a_server_runs_on_stays(
        server_dir, capsys):
    """A soak killed outright (SIGKILL, the OOM killer) leaves its server's folder, a whole
    cluster, and the segment of its server killed with it: the next stack on a PostgreSQL of its
    own deletes both as it starts. A folder a server runs on is another run's, and stays."""
    url, running = start_embedded_postgres(server_dir, free_port(), data_dir="postgres-11111111")
    _, killed = start_embedded_postgres(server_dir, free_port(), data_dir="postgres-22222222")
    left = server_dir / "postgres-22222222"
    segment = PostmasterLock.read(left).shared_memory
    try:
        kill_with_its_children(killed)
        assert attached_by_segment()[segment] == 0
        with socket.socket() as taken:  # (its start stops once it has swept: a port taken)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            stack = Stack(server_dir, ports={"broker": taken.getsockname()[1]},
                          own_postgres=True)
            with pytest.raises(RuntimeError, match="ports already in use"):
                stack.start()
        assert not left.exists()
        assert segment not in attached_by_segment()
        psycopg2.connect(f"{url}/postgres").close()  # (untouched, answering)
        assert (server_dir / "postgres-11111111" / "PG_VERSION").exists()
    finally:
        killed.stop()
        running.stop()
    said = capsys.readouterr().err
    assert f"deleted {left}, left by a run killed before:" in said
    assert f"left {server_dir / 'postgres-11111111'}, a server may run on it:" in said
