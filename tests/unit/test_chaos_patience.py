"""The chaos soak's waits end (bench/chaos): a late shopper's opening deposit the shop never
confirms is given up and noted, and a kind of disruption that can never be dealt is said, not
waited for forever."""

from __future__ import annotations

import random
import subprocess
import threading

import pytest

from bench.chaos import load
from bench.chaos.disruptions import Disruptor
from bench.chaos.load import Ledger, Load, Shopper
from bench.chaos.plan import ChaosPlan


class _NoWait(random.Random):
    def uniform(self, a, b):
        return 0


def test_a_late_shoppers_opening_deposit_never_confirmed_is_given_up_and_noted(monkeypatch):
    monkeypatch.setattr(load, "DEPOSIT_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    shopper = Shopper("late-1", "token")
    shop = Load.__new__(Load)  # (no stack: the shop's answers are _post's below)
    shop.rng, shop.ledger, shop.say = _NoWait(1), Ledger(), lambda message: None
    shop._late, shop._stop = [(shopper, "key")], threading.Event()
    shop._post = lambda shopper, via, path, body, key: (
        (201, None) if path == "/accounts" else (503, None))
    opening = threading.Thread(target=shop._open_late_accounts, daemon=True)
    opening.start()
    opening.join(10)
    assert not opening.is_alive()
    assert shop.ledger.unconfirmed_deposits == {"late-1": [("100.00", 503)]}


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
                              lambda process: True, lambda message: None)
        disruptor.start()
        try:
            with pytest.raises(RuntimeError, match=r"never dealt in 1s: \['childless-child'\]"):
                disruptor.wait_for_every_kind(timeout=1)
        finally:
            disruptor.stop()
            childless.kill()
