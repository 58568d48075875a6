"""The chaos soak's Redis restart (bench/chaos/disruptions.py): the stack's own Redis is killed and
started again on its port after a pause drawn from the disruptor's generator, empty, and answering
before the next disruption, and never another Redis taken for it; a stack with no Redis of its own
is refused. A stack with one (Stack(own_redis=True), servers given) runs on it, not on servers',
and leaves nothing running once stopped, the Redis it restarted included."""

from __future__ import annotations

import os
import random
import signal
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import redis

from bench.chaos.disruptions import Disruptor
from bench.chaos.plan import REDIS_RESTART, ChaosPlan
from bench.chaos.soak import run_chaos, start_the_dead
from devstack.infra import (free_port, port_open, redis_process_id, start_embedded_redis,
                            wait_until)
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import DEFAULT_PORTS, Stack
from tests.process_tools import gone


def test_redis_restarted_comes_back_on_its_port_empty_after_a_pause_of_the_seeds_drawing(
        tmp_path):
    plan = ChaosPlan(seed=7, redis_down_seconds=(0.1, 0.3))
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_redis(tmp_path, free_port())
    group.add(server)
    said = []
    try:
        client = redis.Redis.from_url(url)
        client.set("queued-task", "1")
        first_pid = server.pid
        disruptor = Disruptor(plan, {"redis": server}, group.start_again, lambda rng: 0,
                              said.append, own_urls={"redis": url})
        assert disruptor._disrupt(REDIS_RESTART)
        assert server.pid != first_pid and server.alive()
        assert client.get("queued-task") is None  # (its client reconnects to the same port)
        client.close()
    finally:
        group.stop_all()
    assert said == ["SIGKILL redis", f"redis started again on {url}, empty, answering"]
    drawn = random.Random(f"disruptions-{plan.seed}")
    drawn.uniform(*plan.redis_down_seconds)  # the pause: the one draw it takes
    assert disruptor.rng.getstate() == drawn.getstate()


def test_the_soak_refuses_a_stack_without_a_redis_of_its_own():
    with pytest.raises(ValueError, match="a Redis of its own"):
        run_chaos(SimpleNamespace(own_redis_url=None), ChaosPlan(), lambda message: None)


def _restarting_redis(tmp_path, start_again=None, say=lambda message: None):
    """A Disruptor of a Redis of its own, on the Redis's group; its URL and its process."""
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_redis(tmp_path, free_port())
    group.add(server)
    disruptor = Disruptor(ChaosPlan(seed=7, redis_down_seconds=(0.1, 0.3)), {"redis": server},
                          start_again or group.start_again, lambda rng: 0, say,
                          own_urls={"redis": url})
    return disruptor, group, url, server


def test_a_redis_that_took_the_port_while_ours_was_down_fails_the_restart_and_ours_is_not_started(
        tmp_path):
    others: list[ManagedProcess] = []

    def say(message: str) -> None:
        if message == "SIGKILL redis":  # (another run's Redis takes the port meanwhile)
            others.append(start_embedded_redis(tmp_path / "other", port)[1])

    disruptor, group, url, server = _restarting_redis(tmp_path, say=say)
    port = urlsplit(url).port
    try:
        with pytest.raises(RuntimeError, match=f"port {port} is already in use; cannot start"):
            disruptor._disrupt(REDIS_RESTART)
        assert not server.alive()
    finally:
        group.stop_all()
        for other in others:
            other.stop()


def _then_another_takes_the_port(before_start, tmp_path, url: str,
                                 others: list[ManagedProcess]):
    """`before_start` (the port found free), then another run's Redis started on the port, its
    process added to `others`: the port taken between the look and the start."""
    def check_then_take() -> None:
        before_start()
        others.append(start_embedded_redis(tmp_path / "other", urlsplit(url).port)[1])
    return check_then_take


def test_another_redis_answering_on_the_port_once_ours_is_started_again_fails_the_restart(
        tmp_path):
    """Ours started again, but not answering yet (a stand-in that never does), and another run's
    Redis on the port, taken just after it was found free: the other's answers are not ours."""
    others: list[ManagedProcess] = []

    def start_again_after_another(process: ManagedProcess, before_start) -> bool:
        process.argv = ["sleep", "60"]
        return group.start_again(process, _then_another_takes_the_port(before_start, tmp_path,
                                                                        url, others))

    disruptor, group, url, server = _restarting_redis(tmp_path, start_again_after_another)
    try:
        with pytest.raises(RuntimeError) as refused:
            disruptor._disrupt(REDIS_RESTART)
        assert str(refused.value).startswith(
            f"another Redis (pid {others[0].pid}) answers on {url}, not redis (pid {server.pid})")
    finally:
        group.stop_all()
        for other in others:
            other.stop()


def test_a_redis_stopped_with_the_stack_while_waited_for_is_left_stopped_and_fails_nothing(
        tmp_path):
    """The stack stopping (Ctrl-C) as Redis starts again stops it on purpose: the run's failure
    ("redis exited with code 0") took the KeyboardInterrupt's place on its way up."""
    said: list[str] = []

    def start_again_as_the_stack_stops(process: ManagedProcess, before_start) -> bool:
        started = group.start_again(process, before_start)
        group.stop_all()
        return started

    disruptor, group, url, server = _restarting_redis(tmp_path, start_again_as_the_stack_stops,
                                                      said.append)
    try:
        assert disruptor._disrupt(REDIS_RESTART)
    finally:
        group.stop_all()
    assert said == ["SIGKILL redis", "redis left stopped: the stack is stopping"]


def test_a_redis_that_dies_of_itself_as_it_starts_again_fails_the_restart(tmp_path):
    def start_again_to_die(process: ManagedProcess, before_start) -> bool:
        started = group.start_again(process, before_start)
        os.kill(process.pid, signal.SIGKILL)
        return started

    disruptor, group, url, server = _restarting_redis(tmp_path, start_again_to_die)
    try:
        with pytest.raises(RuntimeError, match="redis exited with code -9 before"):
            disruptor._disrupt(REDIS_RESTART)
    finally:
        group.stop_all()


def _a_dead_redis(tmp_path):
    """A Redis of its own, killed (as the disruptions stop, left down), on its group; its URL."""
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_redis(tmp_path, free_port())
    group.add(server)
    server.kill()
    wait_until(lambda: not server.alive(), 10, what="redis to die")
    return group, url, server


def test_the_dead_redis_is_started_again_by_the_run_answering_as_itself(tmp_path):
    group, url, server = _a_dead_redis(tmp_path)
    said: list[str] = []
    try:
        start_the_dead({"redis": server}, group.start_again, {"redis": url}, said.append)
        assert redis_process_id(url) == server.pid  # (answering already, as the settle begins)
    finally:
        group.stop_all()
    assert said == ["redis not running: started again"]


def test_another_redis_on_the_dead_ones_port_fails_the_run_and_ours_is_not_started(tmp_path):
    """Another run's Redis, having taken the port while ours was down, would answer the settle and
    the checks in its place: the run fails saying so."""
    group, url, server = _a_dead_redis(tmp_path)
    port = urlsplit(url).port
    other = start_embedded_redis(tmp_path / "other", port)[1]
    try:
        with pytest.raises(RuntimeError, match=f"port {port} is already in use; cannot start"):
            start_the_dead({"redis": server}, group.start_again, {"redis": url},
                           lambda message: None)
        assert not server.alive()
    finally:
        group.stop_all()
        other.stop()


def test_a_dead_redis_is_left_stopped_once_the_stacks_stop_has_begun_whoever_holds_its_port(
        tmp_path):
    """start_the_dead runs as a Ctrl-C's KeyboardInterrupt goes by too: the stack stopping, its
    Redis is left stopped, and another run's Redis on the port fails nothing, where the port's
    error took the KeyboardInterrupt's place on its way up."""
    group, url, server = _a_dead_redis(tmp_path)
    other = start_embedded_redis(tmp_path / "other", urlsplit(url).port)[1]
    said: list[str] = []
    try:
        group.stop_all()
        start_the_dead({"redis": server}, group.start_again, {"redis": url}, said.append)
        assert not server.alive()
    finally:
        group.stop_all()
        other.stop()
    assert said == ["redis not running: left stopped"]


def test_another_redis_answering_once_the_dead_one_is_started_again_fails_the_run(tmp_path):
    """Ours started again (a stand-in that never answers), and another run's Redis on the port,
    taken just after it was found free: the other's answers are not ours."""
    group, url, server = _a_dead_redis(tmp_path)
    others: list[ManagedProcess] = []

    def start_again_after_another(process: ManagedProcess, before_start) -> bool:
        process.argv = ["sleep", "60"]
        return group.start_again(process, _then_another_takes_the_port(before_start, tmp_path,
                                                                        url, others))

    try:
        with pytest.raises(RuntimeError, match=f"another Redis .* answers on {url}, not redis"):
            start_the_dead({"redis": server}, start_again_after_another, {"redis": url},
                           lambda message: None)
    finally:
        group.stop_all()
        for other in others:
            other.stop()


def test_a_stack_with_a_redis_of_its_own_runs_on_it_not_on_servers_and_leaves_none_running(
        infrastructure, tmp_path, monkeypatch):
    """Its servers, broker and Redis alone started: no migrations, no apps (nothing they would
    check here)."""
    monkeypatch.setattr(Stack, "_migrate", lambda stack, service: None)
    monkeypatch.setattr(Stack, "_app_processes", lambda stack: [])
    monkeypatch.setattr(Stack, "wait_healthy", lambda stack, timeout=60: None)
    shop = Stack(tmp_path, env_overrides={"CELERY_BROKER_URL": "{redis}/5"},
                 ports={name: free_port() for name in DEFAULT_PORTS},
                 servers=(infrastructure.postgres_base, infrastructure.redis_base), own_redis=True)
    shop.start()
    try:
        processes = {process.name: process for process in shop.processes}
        assert sorted(processes) == ["broker", "redis"]
        own = shop.own_redis_url
        assert urlsplit(own).port != urlsplit(infrastructure.redis_base).port
        assert (shop.env["REDIS_URL"], shop.env["CELERY_BROKER_URL"]) == (f"{own}/0", f"{own}/5")
        redis = processes["redis"]
        first_pid = redis.pid
        pids = [process.pid for process in processes.values()]
        assert redis_process_id(own) == first_pid

        disruptor = Disruptor(ChaosPlan(seed=7, redis_down_seconds=(0.1, 0.3)), processes,
                              shop.start_again, lambda rng: 0, lambda message: None,
                              own_urls={"redis": own})
        assert disruptor._disrupt(REDIS_RESTART)
        pids.append(redis.pid)
        assert redis_process_id(own) == redis.pid != first_pid
    finally:
        shop.stop()
    assert [pid for pid in pids if not gone(pid)] == []
    assert not port_open("127.0.0.1", urlsplit(own).port)
