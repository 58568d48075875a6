"""One chaos run on a started stack: the load offered while the disruptions are dealt (for the
plan's seconds, and until every kind has been dealt), some shoppers holding their notification
sockets through it all, every process alive again, the shop left to settle, the deposits left
unconfirmed sent again (if it did), then the invariants checked, the sockets' once they have had
their time to catch up."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from bench.chaos.disruptions import Disruptor, StartAgain, start_own_server_again
from bench.chaos.followers import Followers
from bench.chaos.invariants import check, settle, sockets_caught_up
from bench.chaos.load import Load
from bench.chaos.plan import SCALED_OUT, ChaosPlan
from bench.chaos.resent_requests import resend_with_fresh_ids
from devstack.processes import ManagedProcess
from devstack.stack import Stack
from shared.config import load_settings


@dataclass(frozen=True)
class ChaosResult:
    seconds: float  # of load: the plan's, or more until each kind of disruption came
    offered: int
    accepted: int
    orders: Counter  # the orders stored, by status
    disruptions: Counter  # those dealt, by kind
    answers: Counter  # the shop's answers to the load, by request and status
    settled: bool
    problems: list[str]
    sockets: Counter  # the followers' sockets opened, how they ended, what gave none


def run_chaos(stack: Stack, plan: ChaosPlan, say: Callable[[str], None]) -> ChaosResult:
    # (Its Redis and PostgreSQL are restarted: no other run's may be.)
    if stack.own_redis_url is None:
        raise ValueError("the chaos soak needs a stack with a Redis of its own (own_redis)")
    if stack.own_postgres_url is None:
        raise ValueError("the chaos soak needs a stack with a PostgreSQL of its own"
                         " (own_postgres)")
    own_urls = {"redis": stack.own_redis_url, "postgres": stack.own_postgres_url}
    with scaled_out(stack, SCALED_OUT if plan.scale_out else ()) as processes:
        load = Load(plan, stack, say)
        load.seed_shoppers()
        say(f"{len(load.shoppers)} shoppers, {plan.late_users} of them opening accounts late,"
            f" {plan.socket_users} holding a notification socket")
        with Followers.of(stack.gateway_url, load.shoppers[:plan.socket_users],
                          plan.seed) as followers:
            resend = partial(resend_with_fresh_ids, load_settings(stack.env))
            disruptor = Disruptor(plan, processes, stack.start_again, resend, say,
                                  own_urls=own_urls).start()
            load.start()
            began = time.monotonic()
            try:
                time.sleep(plan.seconds)
                # However short the run, each kind of disruption comes once.
                disruptor.wait_for_every_kind(plan.every_kind_within())
            finally:
                try:
                    disruptor.stop()
                    # Before the load's stop, which waits for its requests' retries: those to a
                    # process down would wait out their patience, and a deposit go unconfirmed.
                    start_the_dead(processes, stack.start_again, own_urls, say)
                finally:
                    offered = load.stop()
                    seconds = time.monotonic() - began
            say(f"load over: {offered} offered, {len(load.ledger.accepted)} accepted;"
                " settling...")
            settled = settle(stack, plan.settle_seconds)
            # A deposit may or may not have been made: its keyed request sent again says which.
            load.resolve_unconfirmed_deposits(settled)
            problems, orders = check(stack, load.shoppers, load.ledger,
                                     disruptor.outages["postgres"])
            problems += sockets_caught_up(stack, followers, plan.socket_catch_up_seconds)
    if not settled:
        problems.insert(0, f"not settled {plan.settle_seconds:.0f}s after the load")
    return ChaosResult(seconds, offered, len(load.ledger.accepted), orders, disruptor.done,
                       load.ledger.answers, settled, problems, followers.counts())


def start_the_dead(processes: dict[str, ManagedProcess],
                   start_again: StartAgain, own_urls: Mapping[str, str],
                   say: Callable[[str], None]) -> None:
    """Start again each process down: died of itself, or killed as the disruptions stopped (the
    disruptor starts again the others it kills). Through `start_again` (Stack.start_again), which
    starts nothing once the stack is stopping: this runs as a Ctrl-C's KeyboardInterrupt goes by
    too, after the stop it came with has stopped every process, and a process started then would
    be the group's no more, left running with no one to stop it. A server the stack runs of its
    own (its URL in `own_urls` by its name) as the disruptor starts it again
    (start_own_server_again): never another run's on its port taken for it, one that cannot start
    raising why."""
    for name, process in processes.items():
        if not process.alive():
            started = (start_own_server_again(process, own_urls[name], start_again)
                       if name in own_urls else start_again(process))
            say(f"{process.name} not running: {'started again' if started else 'left stopped'}")


@contextmanager
def scaled_out(stack: Stack, names: tuple[str, ...]) -> Iterator[dict[str, ManagedProcess]]:
    """The stack's processes by name, with a second Celery worker of each named one (its own
    node name, log and process group) started for the block, as the stack's own (recorded, and
    stopped with it on Ctrl-C), and stopped after it."""
    processes = {process.name: process for process in stack.processes}
    added = []
    try:
        for name in names:
            worker = processes[name]
            added.append(stack.start_extra(ManagedProcess(
                f"{name}-2", [arg.replace("@%h", "-2@%h") for arg in worker.argv], worker.env,
                worker.log_path.with_name(f"{name}-2.log"), worker.cwd)))
        yield {**processes, **{process.name: process for process in added}}
    finally:
        for process in added:
            process.stop()
