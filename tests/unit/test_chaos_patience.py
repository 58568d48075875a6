"""The chaos soak's waits end (bench/chaos): a late shopper's opening deposit the shop never
confirms is given up and noted, a kind of disruption that can never be dealt is said, not waited
for forever, offers a slow shop leaves waiting do not pile up, and a stop starts nothing again."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from decimal import Decimal

import pytest

from bench.chaos import load
from bench.chaos.disruptions import Disruptor
from bench.chaos.load import Ledger, Load, Shopper, UnconfirmedDeposit
from bench.chaos.plan import ChaosPlan
from bench.chaos.soak import start_the_dead
from devstack.processes import ManagedProcess, ProcessGroup


class _NoWait(random.Random):
    def uniform(self, a, b):
        return 0


def test_a_late_shoppers_opening_deposit_never_confirmed_is_given_up_and_noted(monkeypatch):
    monkeypatch.setattr(load, "DEPOSIT_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    shopper = Shopper("late-1", "token", "shopper-late-1", "a long password")
    shop = Load.__new__(Load)  # (no stack: the shop's answers are _post's below)
    shop.rng, shop.ledger, shop.say = _NoWait(1), Ledger(), lambda message: None
    shop._late, shop._stop = [(shopper, "key")], threading.Event()
    shop._post = lambda shopper, via, path, body, key, deadline: (
        (201, None) if path == "/accounts" else (503, None))
    opening = threading.Thread(target=shop._open_late_accounts, daemon=True)
    opening.start()
    opening.join(10)
    assert not opening.is_alive()
    assert shop.ledger.unconfirmed_deposits == [
        UnconfirmedDeposit(shopper, Decimal("100.00"), "key", "gateway", 503)]


class _OneKindPlan(ChaosPlan):
    def disruptions(self):
        return ("childless-child",)


class _Process:
    def __init__(self, pid: int):
        self.pid, self.name = pid, "childless"


def test_a_kind_of_disruption_never_dealt_is_said_once_the_wait_is_over():
    plan = _OneKindPlan(kill_every=(0.01, 0.02))
    with subprocess.Popen(["sleep", "60"]) as childless:
        disruptor = Disruptor(plan, {"childless": _Process(childless.pid)},
                              lambda process: True, lambda rng: 0, lambda message: None)
        disruptor.start()
        try:
            with pytest.raises(RuntimeError, match=r"never dealt in 1s: \['childless-child'\]"):
                disruptor.wait_for_every_kind(timeout=1)
        finally:
            disruptor.stop()
            childless.kill()


def test_offers_wait_for_a_thread_once_as_many_again_as_the_threads_are_waiting():
    """A shop too slow for the rate slows the offers: none pile up for the stop to wait out."""
    answered = threading.Event()
    shop = Load.__new__(Load)
    shop.plan, shop.rng, shop._stop = ChaosPlan(rate=1000), random.Random(1), threading.Event()
    shop._order = shop._deposit = lambda: answered.wait(10)  # every request unanswered
    offering = threading.Thread(target=shop._offer, daemon=True)
    offering.start()
    try:
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and shop._offered <= 2 * load.LOAD_THREADS:
            time.sleep(0.01)  # (no more offers are to come in the second: nothing to poll for)
        assert shop._offered == 2 * load.LOAD_THREADS
    finally:
        shop._stop.set()
        answered.set()
        offering.join(10)
    assert not offering.is_alive()


def test_the_dead_are_left_stopped_once_the_stacks_stop_has_begun(tmp_path):
    """start_the_dead runs as a Ctrl-C's KeyboardInterrupt goes by too, after the stop it came
    with has stopped every process: it starts none of them again (each would be the group's no
    more, left running with no one to stop it), and says so."""
    group = ProcessGroup(handle_signals=False)
    process = group.start(ManagedProcess("orders-worker", ["sleep", "60"], dict(os.environ),
                                         tmp_path / "orders-worker.log", tmp_path))
    said = []
    try:
        group.stop_all()
        start_the_dead({"orders-worker": process}, group.start_again, "redis://127.0.0.1:6379",
                       said.append)
        assert not process.alive()
        assert said == ["orders-worker not running: left stopped"]
    finally:
        process.stop()
