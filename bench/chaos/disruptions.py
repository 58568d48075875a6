"""The disruptions: processes SIGKILLed (and started again) or SIGSTOPped (and SIGCONT'd), the
stack's own Redis restarted empty and its own PostgreSQL crashed and restarted, or payment requests
sent again under new message ids, one every few seconds, from a shuffled deck of every kind so that
each kind comes once before any comes twice, and a short run still deals every kind."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import psutil
from confluent_kafka import KafkaException

from bench.chaos.plan import (BROKER_PAUSE, PAYMENT_REQUESTS_RESENT, POSTGRES_RESTART,
                              REDIS_RESTART, ChaosPlan)
from devstack.infra import (fail_if_port_taken, wait_for_postgres_of_its_own,
                            wait_for_redis_of_its_own)
from devstack.processes import ManagedProcess


@dataclass(frozen=True)
class OwnServer:
    """A server the stack runs of its own (Stack's own_redis, own_postgres), which the soak
    restarts: its process's name, what it is, what it comes back with, how it is known to answer
    as itself (infra's wait_for_..._of_its_own) and how long it may take to before the run fails
    saying why."""

    name: str
    what: str
    comes_back: str
    wait_for_its_own: Callable[[ManagedProcess, str, float], None]
    answers_within: float


REDIS = OwnServer("redis", "Redis", "empty", wait_for_redis_of_its_own, 15)
# (Its crash recovery replays the WAL written since the last checkpoint: seconds at most here.)
POSTGRES = OwnServer("postgres", "PostgreSQL", "recovered", wait_for_postgres_of_its_own, 60)
OWN_SERVERS = {server.name: server for server in (REDIS, POSTGRES)}


class StartAgain(Protocol):
    """Stack.start_again (ProcessGroup.start_again): a process started again, with what is to be
    checked just before, unless the stack is stopping (False, nothing checked nor started)."""

    def __call__(self, process: ManagedProcess,
                 before_start: Callable[[], None] | None = None) -> bool: ...


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a gunicorn master's workers); none if it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def kill_with_its_children(process: ManagedProcess, timeout: float = 10) -> None:
    """SIGKILL the process's group and every descendant of its leader, and wait until all are
    gone (raising, naming those left, after `timeout`). A descendant in a session of its own is
    out of the group's reach: each PostgreSQL backend is one (the postmaster makes each child
    its own session's leader, InitPostmasterChild's setsid), and a busy one outlived the
    postmaster killed alone, still able to commit, holding the shared memory the server started
    again was refused over ("pre-existing shared memory block ... is still in use"). The leader
    is frozen (SIGSTOP) before its descendants are listed, so that it forks none after.

    Only a process alive and not reaped: its pid is still its own (one reaped, died of itself,
    may be another's by now, which would be frozen and have its children killed; one never
    started has none, and psutil's Process(None) is the caller). The leader is killed whatever
    the listing raises, so that it is never left frozen."""
    if not process.alive():
        return
    descendants: list[psutil.Process] = []
    try:
        leader = psutil.Process(process.pid)
        leader.suspend()
        descendants = leader.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    finally:
        process.kill()
    for descendant in descendants:
        try:
            descendant.kill()  # (psutil's, which refuses a pid reused since it was listed)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while True:
        # (The leader is ours to reap, through its Popen: psutil's wait would take its exit code.)
        left = [process.pid] if process.alive() else []
        left += [each.pid for each in descendants if not _gone(each)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} SIGKILLed, but not gone after {timeout:g}s:"
                               f" pids {left}")
        time.sleep(0.02)


def _gone(process: psutil.Process) -> bool:
    """Whether a process has ended: exited (a zombie, its parent yet to reap it, holds nothing
    and runs nothing) or reaped (its pid another's since, or no one's)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Disruptor:
    """Deals the plan's disruptions to the named processes from a thread of its own until
    stopped; `done` counts those dealt by kind, and `every_kind_dealt` is set once each kind has
    been dealt at least once."""

    def __init__(self, plan: ChaosPlan, processes: dict[str, ManagedProcess],
                 start_again: StartAgain,
                 resend_payment_requests: Callable[[random.Random], int],
                 say: Callable[[str], None], own_urls: Mapping[str, str] | None = None):
        self.plan, self.processes, self.say = plan, processes, say
        # The URL of each server the stack runs of its own (Stack.own_redis_url,
        # own_postgres_url), by its process's name in `processes` (OWN_SERVERS).
        self.own_urls = dict(own_urls or {})
        # The stack's (Stack.start_again): it starts nothing once the stack is stopping (Ctrl-C).
        self.start_again = start_again
        # resent_requests.resend_with_fresh_ids, on the stack's broker and topic: how many sent.
        self.resend_payment_requests = resend_payment_requests
        self.rng = random.Random(f"disruptions-{plan.seed}")
        self.done: Counter[str] = Counter()
        # When each server of its own was down, by name (OWN_SERVERS): from its kill until it
        # answered again, or was left down (time.monotonic()'s), as the invariants' excuse of a
        # try PostgreSQL's crash may have failed as it committed (load.Request.ambiguous).
        self.outages: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        self.every_kind_dealt = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._resumes: list[threading.Timer] = []
        self._thread = threading.Thread(target=self._deal, name="chaos-disruptor")

    def start(self) -> Disruptor:
        self._thread.start()
        return self

    def wait_for_every_kind(self, timeout: float) -> None:
        """Return once each kind has been dealt, or the dealing failed (stop() raises why); raise
        if some kind is still not dealt after `timeout` (one that can never be, such as a child
        of a master that forks none)."""
        deadline = time.monotonic() + timeout
        while not self.every_kind_dealt.wait(0.5) and self._thread.is_alive():
            if time.monotonic() > deadline:
                never = sorted(set(self.plan.disruptions()) - set(self.done))
                raise RuntimeError(f"disruptions never dealt in {timeout:.0f}s: {never}")

    def stop(self) -> None:
        """Stop dealing, and wait for every paused process to be resumed; raise what made the
        dealing fail, if it did."""
        self._stop.set()
        self._thread.join()
        for timer in self._resumes:
            timer.join()
        if self.error is not None:
            raise RuntimeError("the disruptions failed") from self.error

    def _deal(self) -> None:
        try:
            self._deal_until_stopped()
        except BaseException as exc:  # (raised again by stop())
            self.error = exc

    def _deal_until_stopped(self) -> None:
        kinds = self.plan.disruptions()
        deck: list[str] = []
        while not self._stop.wait(self.rng.uniform(*self.plan.kill_every)):
            if not deck:
                deck = list(kinds)
                self.rng.shuffle(deck)
            kind = deck.pop()
            if self._disrupt(kind):
                self.done[kind] += 1
            else:
                deck.insert(0, kind)  # dealt again once the rest of the deck is
            if set(self.done) >= set(kinds):
                self.every_kind_dealt.set()

    def _disrupt(self, kind: str) -> bool:
        if kind == BROKER_PAUSE:
            self._pause_broker()
        elif kind == PAYMENT_REQUESTS_RESENT:
            return self._resend_payment_requests()
        elif kind == REDIS_RESTART:
            self._restart_own(REDIS, kind, self.plan.redis_down_seconds)
        elif kind == POSTGRES_RESTART:
            self._restart_own(POSTGRES, kind, self.plan.postgres_down_seconds)
        elif kind.startswith("pause:"):
            self._pause(self.processes[kind.removeprefix("pause:")])
        elif kind.endswith("-child"):
            return self._kill_a_child(kind, self.processes[kind.removesuffix("-child")])
        else:
            self._kill_and_restart(self.processes[kind])
        return True

    def _pause_broker(self) -> None:
        """Kafka unanswering for seconds, as a broker in a long GC pause or partitioned away: the
        thread waits it out, so that no other disruption overlaps it."""
        broker = self.processes["broker"]
        seconds = self.rng.uniform(*self.plan.broker_pause_seconds)
        self.say(f"broker SIGSTOP for {seconds:.1f}s")
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            self._stop.wait(seconds)
        finally:
            os.kill(broker.pid, signal.SIGCONT)

    def _resend_payment_requests(self) -> bool:
        """Some payment requests published so far sent again under fresh ids; not dealt (put
        back under the deck) while none is published yet. The copies are drawn by a generator of
        their own, seeded by one draw of the disruptor's: how many draws drawing them takes
        depends on how many were published, which is timing, and the disruptor's own draws (its
        waits, pauses, restarts, the deck) must be the seed's alone. A broker that fails the
        reading or the sending (its metadata not answered in time, a read refused) is said, and
        the kind put back too: the broker is disrupted as well, and the soak goes on."""
        copies_rng = random.Random(self.rng.getrandbits(64))
        try:
            sent = self.resend_payment_requests(copies_rng)
        except KafkaException as exc:
            self.say(f"payment requests not sent again: {exc}")
            return False
        if sent:
            self.say(f"{sent} payment requests sent again under new message ids")
        return sent > 0

    def _pause(self, process: ManagedProcess) -> None:
        """A whole process group frozen (its tasks' visibility and its Kafka session time out
        meanwhile), resumed by a timer while other disruptions go on."""
        seconds = self.rng.uniform(*self.plan.pause_seconds)
        pid = process.pid
        os.killpg(pid, signal.SIGSTOP)
        self.say(f"SIGSTOP {process.name} for {seconds:.1f}s")

        def resume() -> None:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed (and started afresh) while paused
        timer = threading.Timer(seconds, resume)
        self._resumes.append(timer)
        timer.start()

    def _kill_a_child(self, kind: str, master: ManagedProcess) -> bool:
        kids = children(master.pid)
        if not kids:
            return False  # its master is forking the one killed last
        os.kill(self.rng.choice(kids), signal.SIGKILL)
        self.say(f"SIGKILL {kind}")
        return True

    def _restart_own(self, server: OwnServer, kind: str, down_for: tuple[float, float]) -> None:
        """A server the stack runs of its own SIGKILLed with every process of it
        (kill_with_its_children) and, after a pause drawn from `down_for`, started again on its
        port, every client's connection broken. Redis comes back empty (it keeps nothing on
        disk): every queued Celery task, cached read, rate count and signature note gone.
        PostgreSQL comes back as after a crash, on its data directory: its postmaster frozen,
        then it and every backend (each in a session of its own, out of the postmaster's group's
        reach) SIGKILLed and waited for until gone, none left to commit after the crash or
        holding the shared memory (a busy backend outlived its postmaster killed alone, and the
        new one was refused to start while it held it), so its start recovers from the WAL,
        what was committed kept (fsync=off loses nothing to a process's death: only to the
        machine's). Started again through start_own_server_again, so that nothing else is
        disrupted until it answers, and one that cannot start again fails the run, saying why."""
        url = self.own_urls.get(server.name)
        if url is None:
            raise RuntimeError(f"{kind}: the stack runs no {server.what} of its own")
        process = self.processes[server.name]
        killed_at = time.monotonic()
        try:
            if self._kill_and_restart(process, down_for,
                                      start=lambda: start_own_server_again(process, url,
                                                                           self.start_again)):
                self.say(f"{server.name} started again on {url}, {server.comes_back}, answering")
        finally:
            self.outages[server.name].append((killed_at, time.monotonic()))

    def _kill_and_restart(self, process: ManagedProcess,
                          down_for: tuple[float, float] | None = None,
                          start: Callable[[], bool] | None = None) -> bool:
        """SIGKILL the process with its children (kill_with_its_children), and start it again
        once they are gone, after a pause drawn from `down_for`
        (the plan's restart_after by default), through `start` (self.start_again by default;
        False if it started nothing, the stack stopping); False if it was left stopped."""
        kill_with_its_children(process)
        self.say(f"SIGKILL {process.name}")
        # Not started again once the run or the stack is stopping: the stack's stop may have
        # passed it (the run starts again what is down before it settles, start_the_dead).
        if self._stop.wait(self.rng.uniform(*(down_for or self.plan.restart_after))):
            return False
        if not (start() if start is not None else self.start_again(process)):
            self.say(f"{process.name} left stopped: the stack is stopping")
            return False
        return True


def start_own_server_again(process: ManagedProcess, url: str, start_again: StartAgain) -> bool:
    """A server the stack runs of its own (OWN_SERVERS, by the process's name), down, started
    again on its port (`url`'s) through `start_again` (Stack.start_again), and waited for until
    it answers as itself; False if it was left stopped, the stack stopping (Ctrl-C) before or
    while it was waited for (no failure of the run's, and one raised would take the
    KeyboardInterrupt's place on its way up, run_chaos). Raises, saying why, if it cannot start
    again: its port taken (by another run's server, which would answer in its place: found open
    just before the start, or answering as another process after it), or it exiting of itself.
    The port is looked at by start_again, once it knows the stack is not stopping: looked at
    first, a port taken would raise in a stopping stack's False's place."""
    server = OWN_SERVERS[process.name]
    port = urlsplit(url).port
    if not start_again(process, lambda: fail_if_port_taken(port, server.what)):
        return False
    try:
        server.wait_for_its_own(process, url, server.answers_within)
    except RuntimeError:
        if process.alive() or process.died():
            raise
        return False
    return True
