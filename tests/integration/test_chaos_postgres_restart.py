"""The chaos soak's PostgreSQL restart (bench/chaos/disruptions.py): the stack's own PostgreSQL is
crashed (its postmaster and every backend SIGKILLed, a busy one too) and started again on its port
and data directory after a pause drawn from the disruptor's generator, what was committed kept,
its clients' old connections broken, answering as itself before the next disruption, and never
another PostgreSQL taken for it; a stack with none of its own is refused. A stack with one
(Stack(own_postgres=True), servers given) runs on it, not on servers', and leaves nothing running
once stopped, the PostgreSQL it restarted included."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import psycopg2
import pytest

from bench.chaos.disruptions import Disruptor, children, kill_with_its_children
from bench.chaos.plan import POSTGRES_RESTART, ChaosPlan
from bench.chaos.soak import run_chaos, start_the_dead
from bench.shop import forget_postgres_data
from devstack.infra import (free_port, port_open, postgres_process_id, start_embedded_postgres,
                            wait_until)
from devstack.postmaster_lock import (PostmasterLock, attached_by_segment,
                                      remove_shared_memory_left)
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import DEFAULT_PORTS, Stack
from tests.process_tools import gone

PLAN = ChaosPlan(seed=7, postgres_down_seconds=(0.1, 0.3))


def _restarting_postgres(folder, start_again=None, say=lambda message: None):
    """A Disruptor of a PostgreSQL of its own, on the server's group; its URL and its process."""
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_postgres(folder, free_port())
    group.add(server)
    disruptor = Disruptor(PLAN, {"postgres": server}, start_again or group.start_again,
                          lambda rng: 0, say, own_urls={"postgres": url})
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


def test_the_soak_refuses_a_stack_without_a_postgresql_of_its_own():
    with pytest.raises(ValueError, match="a PostgreSQL of its own"):
        run_chaos(SimpleNamespace(own_redis_url="redis://127.0.0.1:1", own_postgres_url=None),
                  ChaosPlan(), lambda message: None)


def test_a_postgres_on_the_port_while_ours_was_down_fails_the_restart_and_ours_is_not_started(
        server_dir):
    others: list[ManagedProcess] = []

    def say(message: str) -> None:
        if message == "SIGKILL postgres":  # (another run's PostgreSQL takes the port meanwhile)
            others.append(start_embedded_postgres(server_dir / "other", port)[1])

    disruptor, group, url, server = _restarting_postgres(server_dir / "ours", say=say)
    port = urlsplit(url).port
    try:
        with pytest.raises(RuntimeError, match=f"port {port} is already in use; cannot start"
                                               " PostgreSQL"):
            disruptor._disrupt(POSTGRES_RESTART)
        assert not server.alive()
    finally:
        group.stop_all()
        for other in others:
            other.stop()
        remove_shared_memory_left(server_dir / "ours" / "postgres")


def test_another_postgres_answering_on_the_port_once_ours_is_started_again_fails_the_restart(
        server_dir):
    """Ours started again, but not answering yet (a stand-in that never does), and another run's
    PostgreSQL on the port, taken just after it was found free: its answers are not ours."""
    others: list[ManagedProcess] = []

    def start_again_after_another(process: ManagedProcess, before_start) -> bool:
        def check_then_take() -> None:
            before_start()
            others.append(start_embedded_postgres(server_dir / "other", urlsplit(url).port)[1])

        process.argv, process.user = ["sleep", "60"], None
        return group.start_again(process, check_then_take)

    disruptor, group, url, server = _restarting_postgres(server_dir / "ours",
                                                         start_again_after_another)
    try:
        with pytest.raises(RuntimeError) as refused:
            disruptor._disrupt(POSTGRES_RESTART)
        assert str(refused.value).startswith(
            f"another PostgreSQL (pid {others[0].pid}) answers on {url}, not postgres"
            f" (pid {server.pid})")
    finally:
        group.stop_all()
        for other in others:
            other.stop()
        remove_shared_memory_left(server_dir / "ours" / "postgres")


def test_a_postgres_that_dies_of_itself_as_it_starts_again_fails_the_restart(server_dir):
    def start_again_to_die(process: ManagedProcess, before_start) -> bool:
        started = group.start_again(process, before_start)
        os.kill(process.pid, signal.SIGKILL)
        return started

    disruptor, group, url, server = _restarting_postgres(server_dir, start_again_to_die)
    try:
        with pytest.raises(RuntimeError, match="postgres exited with code -9 before"):
            disruptor._disrupt(POSTGRES_RESTART)
    finally:
        group.stop_all()
        remove_shared_memory_left(server_dir / "postgres")


def test_the_dead_postgres_is_started_again_by_the_run_answering_as_itself(server_dir):
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_postgres(server_dir, free_port())
    group.add(server)
    server.kill()  # (as the disruptions stop, left down)
    wait_until(lambda: not server.alive(), 10, what="postgres to die")
    said: list[str] = []
    try:
        start_the_dead({"postgres": server}, group.start_again, {"postgres": url}, said.append)
        assert postgres_process_id(url) == server.pid  # (answering already, as the settle begins)
    finally:
        group.stop_all()
    assert said == ["postgres not running: started again"]


def test_a_stack_with_a_postgres_of_its_own_runs_on_it_not_on_servers_and_leaves_none_running(
        infrastructure, server_dir, monkeypatch):
    """Its servers, broker and PostgreSQL alone started: no migrations, no apps (nothing they
    would check here)."""
    monkeypatch.setattr(Stack, "_migrate", lambda stack, service: None)
    monkeypatch.setattr(Stack, "_app_processes", lambda stack: [])
    monkeypatch.setattr(Stack, "wait_healthy", lambda stack, timeout=60: None)
    shop = Stack(server_dir, env_overrides={"ORDERS_DATABASE_URL": "{postgres}/orders_here"},
                 ports={name: free_port() for name in DEFAULT_PORTS},
                 servers=(infrastructure.postgres_base, infrastructure.redis_base),
                 own_postgres=True)
    shop.start()
    try:
        processes = {process.name: process for process in shop.processes}
        assert sorted(processes) == ["broker", "postgres"]
        own = shop.own_postgres_url
        assert urlsplit(own).port != urlsplit(infrastructure.postgres_base).port
        assert shop.env["ORDERS_DATABASE_URL"] == f"{own}/orders_here"
        assert shop.env["PAYMENTS_DATABASE_URL"] == f"{own}/hseshop_payments"
        assert shop.env["REDIS_URL"] == f"{infrastructure.redis_base}/0"
        postgres = processes["postgres"]
        first_pid = postgres.pid
        # (Its backends and helpers, each in a session of its own: out of its group's reach.)
        pids = [process.pid for process in processes.values()] + children(first_pid)
        segments = [PostmasterLock.read(shop.own_postgres_dir).shared_memory]
        assert postgres_process_id(own) == first_pid

        disruptor = Disruptor(PLAN, processes, shop.start_again, lambda rng: 0,
                              lambda message: None, own_urls={"postgres": own})
        assert disruptor._disrupt(POSTGRES_RESTART)
        pids += [postgres.pid, *children(postgres.pid)]
        segments.append(PostmasterLock.read(shop.own_postgres_dir).shared_memory)
        assert postgres_process_id(own) == postgres.pid != first_pid
    finally:
        shop.stop()
    assert len(pids) > 3  # (a postmaster's children found: its checkpointer, its writers...)
    assert [pid for pid in pids if not gone(pid)] == []
    assert not port_open("127.0.0.1", urlsplit(own).port)
    assert None not in segments and set(segments).isdisjoint(attached_by_segment())
