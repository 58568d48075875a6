"""What the chaos soak's restart of a server the stack runs of its own does alike for each of
OWN_SERVERS, Redis and PostgreSQL (bench/chaos/disruptions.py): never another run's server on its
port taken for it, whether the port was taken while it was down or just after it was found free;
one stopped with the stack as it is waited for left stopped, failing nothing; one dying as it
starts failing the run; and the same of the run's start of those left down (start_the_dead). A
stack with none of its own is refused; a stack with one (Stack(own_redis=True), own_postgres,
servers given) runs on it, not on servers', and leaves nothing of it once stopped, the one it
restarted included. What each comes back with is its own file's: test_chaos_redis_restart.py,
test_chaos_postgres_restart.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from bench.chaos.disruptions import (OWN_SERVERS, POSTGRES, REDIS, Disruptor, OwnServer,
                                     children, kill_with_its_children)
from bench.chaos.plan import POSTGRES_RESTART, REDIS_RESTART, ChaosPlan
from bench.chaos.soak import run_chaos, start_the_dead
from devstack.infra import (free_port, port_open, postgres_process_id, redis_process_id,
                            start_embedded_postgres, start_embedded_redis)
from devstack.postmaster_lock import (PostmasterLock, attached_by_segment,
                                      remove_shared_memory_left)
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import DEFAULT_PORTS, Stack
from tests.process_tools import gone

PLAN = ChaosPlan(seed=7, redis_down_seconds=(0.1, 0.3), postgres_down_seconds=(0.1, 0.3))


@dataclass(frozen=True)
class Restarted:
    """One of OWN_SERVERS as the tests start it in a folder on a port (infra's start_embedded_...),
    the disruption that restarts it, the pid it says it answers as, and what one killed for good
    in a folder leaves behind, removed (PostgreSQL's shared memory; nothing of Redis's)."""

    server: OwnServer
    kind: str
    start: Callable[[Path, int], tuple[str, ManagedProcess]]
    process_id: Callable[[str], int | None]
    remove_leftovers: Callable[[Path], object]
    # A stack's environment overrides naming it, and what the stack's environment then holds,
    # given its URL and the session's servers.
    env_overrides: dict[str, str]
    env_expected: Callable[[str, SimpleNamespace], dict[str, str]]
    # The System V segment a stack's one holds (PostgreSQL's: its postmaster.pid's), if any.
    shared_memory: Callable[[Stack], tuple[int, int] | None]
    # Whether it runs children (PostgreSQL's backends and helpers) and holds a segment: found,
    # for the test to check that none is left.
    has_children_and_segment: bool


RESTARTED = {
    "redis": Restarted(
        REDIS, REDIS_RESTART, start_embedded_redis, redis_process_id, lambda folder: None,
        {"CELERY_BROKER_URL": "{redis}/5"},
        lambda own, servers: {"REDIS_URL": f"{own}/0", "CELERY_BROKER_URL": f"{own}/5",
                              "ORDERS_DATABASE_URL": f"{servers.postgres_base}/hseshop_orders"},
        lambda stack: None, False),
    "postgres": Restarted(
        POSTGRES, POSTGRES_RESTART, start_embedded_postgres, postgres_process_id,
        lambda folder: remove_shared_memory_left(folder / "postgres"),
        {"ORDERS_DATABASE_URL": "{postgres}/orders_here"},
        lambda own, servers: {"ORDERS_DATABASE_URL": f"{own}/orders_here",
                              "PAYMENTS_DATABASE_URL": f"{own}/hseshop_payments",
                              "REDIS_URL": f"{servers.redis_base}/0"},
        lambda stack: PostmasterLock.read(stack.own_postgres_dir).shared_memory, True),
}


class Rig:
    """A server of its own (`restarted`'s) started in folder/ours on a group of its own, and the
    other runs' servers the tests start on its port (in folder/other); `close` stops them all and
    removes what ours, killed for good, left."""

    def __init__(self, restarted: Restarted, folder: Path):
        self.restarted, self.folder = restarted, folder
        self.name = restarted.server.name
        self.group = ProcessGroup(handle_signals=False)
        self.others: list[ManagedProcess] = []
        self.url, self.server = restarted.start(folder / "ours", free_port())
        self.group.add(self.server)
        self.port = urlsplit(self.url).port

    def disruptor(self, start_again=None, say=lambda message: None) -> Disruptor:
        return Disruptor(PLAN, {self.name: self.server}, start_again or self.group.start_again,
                         lambda rng: 0, say, own_urls={self.name: self.url})

    def restart(self, disruptor: Disruptor) -> bool:
        return disruptor._disrupt(self.restarted.kind)

    def start_the_dead(self, start_again=None, say=lambda message: None) -> None:
        start_the_dead({self.name: self.server}, start_again or self.group.start_again,
                       {self.name: self.url}, say)

    def another_on_the_port(self) -> ManagedProcess:
        """Another run's server of the kind, started on our port."""
        other = self.restarted.start(self.folder / "other", self.port)[1]
        self.others.append(other)
        return other

    def then_another_takes_the_port(self, before_start: Callable[[], None]
                                    ) -> Callable[[], None]:
        """`before_start` (the port found free), then another run's server started on the port:
        the port taken between the look and the start."""
        def check_then_take() -> None:
            before_start()
            self.another_on_the_port()
        return check_then_take

    def never_answering_once_started(self) -> None:
        """Ours, started again, a stand-in that never answers."""
        self.server.argv, self.server.user = ["sleep", "60"], None

    def kill(self) -> None:
        """Ours killed, as the disruptions stop, left down."""
        kill_with_its_children(self.server)

    def close(self) -> None:
        self.group.stop_all()
        for other in self.others:
            other.stop()
        self.restarted.remove_leftovers(self.folder / "ours")


@pytest.fixture
def servers_alone_stack(infrastructure, monkeypatch):
    """Makes an unstarted Stack, in a folder, of environment overrides and a server of its own
    (own_redis, own_postgres) on free ports, that starts its servers and broker alone: no
    migrations, no apps, no health waited for (nothing checked here). The server it has none of
    its own of is the session's."""
    monkeypatch.setattr(Stack, "_migrate", lambda stack, service: None)
    monkeypatch.setattr(Stack, "_app_processes", lambda stack: [])
    monkeypatch.setattr(Stack, "wait_healthy", lambda stack, timeout=60: None)

    def make(folder: Path, env_overrides: dict[str, str], **own: bool) -> Stack:
        return Stack(folder, env_overrides=env_overrides,
                     ports={name: free_port() for name in DEFAULT_PORTS},
                     servers=(infrastructure.postgres_base, infrastructure.redis_base), **own)
    return make


@pytest.fixture(params=sorted(OWN_SERVERS))
def restarted(request) -> Restarted:
    return RESTARTED[request.param]


@pytest.fixture
def rig(restarted, server_dir) -> Iterator[Rig]:
    rig = Rig(restarted, server_dir)
    try:
        yield rig
    finally:
        rig.close()


def test_the_soak_refuses_a_stack_without_one_of_its_own(restarted):
    urls = {"own_redis_url": "redis://127.0.0.1:1",
            "own_postgres_url": "postgresql://postgres@127.0.0.1:1",
            f"own_{restarted.server.name}_url": None}
    with pytest.raises(ValueError, match=f"a {restarted.server.what} of its own"):
        run_chaos(SimpleNamespace(**urls), ChaosPlan(), lambda message: None)


def test_one_that_took_the_port_while_ours_was_down_fails_the_restart_and_ours_is_not_started(
        rig):
    def say(message: str) -> None:
        if message == f"SIGKILL {rig.name}":  # (another run's server takes the port meanwhile)
            rig.another_on_the_port()

    with pytest.raises(RuntimeError, match=f"port {rig.port} is already in use; cannot start"
                                           f" {rig.restarted.server.what}"):
        rig.restart(rig.disruptor(say=say))
    assert not rig.server.alive()


def test_another_answering_on_the_port_once_ours_is_started_again_fails_the_restart(rig):
    """Ours started again, but not answering yet, and another run's server on the port, taken
    just after it was found free: the other's answers are not ours."""
    def start_again_after_another(process: ManagedProcess, before_start) -> bool:
        rig.never_answering_once_started()
        return rig.group.start_again(process, rig.then_another_takes_the_port(before_start))

    with pytest.raises(RuntimeError) as refused:
        rig.restart(rig.disruptor(start_again_after_another))
    assert str(refused.value).startswith(
        f"another {rig.restarted.server.what} (pid {rig.others[0].pid}) answers on {rig.url},"
        f" not {rig.name} (pid {rig.server.pid})")


def test_one_stopped_with_the_stack_while_waited_for_is_left_stopped_and_fails_nothing(rig):
    """The stack stopping (Ctrl-C) as it starts again stops it on purpose: the run's failure
    ("redis exited with code 0", say) took the KeyboardInterrupt's place on its way up."""
    said: list[str] = []

    def start_again_as_the_stack_stops(process: ManagedProcess, before_start) -> bool:
        started = rig.group.start_again(process, before_start)
        rig.group.stop_all()
        return started

    assert rig.restart(rig.disruptor(start_again_as_the_stack_stops, said.append))
    assert said == [f"SIGKILL {rig.name}", f"{rig.name} left stopped: the stack is stopping"]


def test_one_that_dies_of_itself_as_it_starts_again_fails_the_restart(rig):
    def start_again_to_die(process: ManagedProcess, before_start) -> bool:
        started = rig.group.start_again(process, before_start)
        os.kill(process.pid, signal.SIGKILL)
        return started

    with pytest.raises(RuntimeError, match=f"{rig.name} exited with code -9 before"):
        rig.restart(rig.disruptor(start_again_to_die))


def test_the_dead_one_is_started_again_by_the_run_answering_as_itself(rig):
    rig.kill()
    said: list[str] = []
    rig.start_the_dead(say=said.append)
    assert rig.restarted.process_id(rig.url) == rig.server.pid  # (answering, as the settle begins)
    assert said == [f"{rig.name} not running: started again"]


def test_another_on_the_dead_ones_port_fails_the_run_and_ours_is_not_started(rig):
    """Another run's server, having taken the port while ours was down, would answer the settle
    and the checks in its place: the run fails saying so."""
    rig.kill()
    rig.another_on_the_port()
    with pytest.raises(RuntimeError, match=f"port {rig.port} is already in use; cannot start"):
        rig.start_the_dead()
    assert not rig.server.alive()


def test_a_dead_one_is_left_stopped_once_the_stacks_stop_has_begun_whoever_holds_its_port(rig):
    """start_the_dead runs as a Ctrl-C's KeyboardInterrupt goes by too: the stack stopping, its
    server is left stopped, and another run's on the port fails nothing, where the port's error
    took the KeyboardInterrupt's place on its way up."""
    rig.kill()
    rig.another_on_the_port()
    said: list[str] = []
    rig.group.stop_all()
    rig.start_the_dead(say=said.append)
    assert not rig.server.alive()
    assert said == [f"{rig.name} not running: left stopped"]


def test_another_answering_once_the_dead_one_is_started_again_fails_the_run(rig):
    """Ours started again (a stand-in that never answers), and another run's server on the port,
    taken just after it was found free: the other's answers are not ours."""
    rig.kill()

    def start_again_after_another(process: ManagedProcess, before_start) -> bool:
        rig.never_answering_once_started()
        return rig.group.start_again(process, rig.then_another_takes_the_port(before_start))

    with pytest.raises(RuntimeError, match=f"another {rig.restarted.server.what} .* answers on"
                                           f" {rig.url}, not {rig.name}"):
        rig.start_the_dead(start_again_after_another)


def test_a_stack_with_one_of_its_own_runs_on_it_not_on_servers_and_leaves_none_running(
        restarted, infrastructure, servers_alone_stack, server_dir):
    """Nothing of it left once the stack has stopped, the one it restarted included: no process
    (nor a child of it: a PostgreSQL backend leads a session of its own, out of its group's
    reach), no port, no shared memory."""
    name = restarted.server.name
    shop = servers_alone_stack(server_dir, restarted.env_overrides, **{f"own_{name}": True})
    shop.start()
    try:
        processes = {process.name: process for process in shop.processes}
        assert sorted(processes) == ["broker", name]
        own = getattr(shop, f"own_{name}_url")
        assert urlsplit(own).port != urlsplit(getattr(infrastructure, f"{name}_base")).port
        expected = restarted.env_expected(own, infrastructure)
        assert {key: shop.env[key] for key in expected} == expected
        server = processes[name]
        first_pid = server.pid
        pids = [process.pid for process in processes.values()] + children(first_pid)
        segments = [restarted.shared_memory(shop)]
        assert restarted.process_id(own) == first_pid

        disruptor = Disruptor(PLAN, processes, shop.start_again, lambda rng: 0,
                              lambda message: None, own_urls={name: own})
        assert disruptor._disrupt(restarted.kind)
        pids += [server.pid, *children(server.pid)]
        segments.append(restarted.shared_memory(shop))
        assert restarted.process_id(own) == server.pid != first_pid
    finally:
        shop.stop()
    found = len(pids) > 3 and None not in segments  # (beside the broker and the two servers)
    assert found == restarted.has_children_and_segment
    assert [pid for pid in pids if not gone(pid)] == []
    assert not port_open("127.0.0.1", urlsplit(own).port)
    assert set(segments).isdisjoint(attached_by_segment())
