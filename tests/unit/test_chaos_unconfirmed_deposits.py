"""The chaos soak's deposits left unconfirmed (bench/chaos/load.py): each is sent again with its
key once the shop has settled, and counts as deposited when the shop answers it, replayed (made
during the run) or fresh (made now); one still unanswered is a violation of its own, never a
balance that looks wrong."""

from __future__ import annotations

import threading
from decimal import Decimal

from bench.chaos import load
from bench.chaos.invariants import _balances
from bench.chaos.load import Ledger, Load, Shopper, UnconfirmedDeposit, transient
from shared.idempotency import REPLAYED, REPLAYED_HEADER

SHOPPER = Shopper("u1", "token", "shopper-u1", "a long password")


def _unconfirmed(amount: str, key: str = "k1") -> UnconfirmedDeposit:
    return UnconfirmedDeposit(SHOPPER, Decimal(amount), key, "gateway", "ReadTimeout")


def test_a_deposit_answered_replayed_was_made_before_and_counts_once():
    ledger = Ledger()
    assert ledger.resolve(_unconfirmed("12.50"), 200, replayed=True) == "made before"
    assert ledger.deposited["u1"] == Decimal("12.50")


def test_a_deposit_answered_fresh_is_made_now_and_counts_once():
    ledger = Ledger()
    assert ledger.resolve(_unconfirmed("12.50"), 200, replayed=False) == "made now"
    assert ledger.deposited["u1"] == Decimal("12.50")


def test_a_deposit_answered_404_was_never_made_and_counts_nothing():
    """No account: no try of it made it (the account is never closed)."""
    ledger = Ledger()
    assert ledger.resolve(_unconfirmed("12.50"), 404, replayed=False) == "never made"
    assert ledger.deposited["u1"] == 0


def test_a_deposit_answered_otherwise_stays_unconfirmed():
    ledger = Ledger()
    for status in (503, 504, "ConnectionError", 401):
        assert ledger.resolve(_unconfirmed("12.50"), status, replayed=False) is None
    assert ledger.deposited["u1"] == 0


class _Answer:
    def __init__(self, replayed: bool):
        self.headers = {REPLAYED_HEADER: REPLAYED} if replayed else {}


def _load_answering(answers: dict[str, list]) -> Load:
    """A Load without a stack, whose deposit under each key is answered in turn by `answers`
    (the last answer again once they run out)."""
    shop = Load.__new__(Load)
    shop.ledger, shop.say, shop._stop = Ledger(), lambda message: None, threading.Event()

    def post(shopper, via, path, body, key, deadline):
        given = answers[key]
        status, replayed = given.pop(0) if len(given) > 1 else given[0]
        return status, _Answer(replayed) if status == 200 else None
    shop._post = post
    return shop


def test_unconfirmed_deposits_sent_again_count_as_answered_and_leave_none_unconfirmed(
        monkeypatch):
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    shop = _load_answering({"made-before": [(503, False), (200, True)],
                            "made-now": [(200, False)]})
    shop.ledger.deposited["u1"] = Decimal("100.00")
    shop.ledger.unconfirmed_deposits += [_unconfirmed("10.00", "made-before"),
                                         _unconfirmed("2.50", "made-now")]
    shop.resolve_unconfirmed_deposits(shop_settled=True)
    assert shop.ledger.unconfirmed_deposits == []
    assert shop.ledger.deposited["u1"] == Decimal("112.50")
    # The balance the shop holds (the opening 100.00 and both deposits) is then no violation.
    assert _balances({}, {}, {"u1": Decimal("112.50")}, [SHOPPER], shop.ledger) == []


def test_a_deposit_still_unanswered_after_the_run_is_a_violation_of_its_own(monkeypatch):
    monkeypatch.setattr(load, "RESOLVE_SECONDS", 0.1)
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    shop = _load_answering({"k1": [("ReadTimeout", False)]})
    shop.ledger.deposited["u1"] = Decimal("100.00")
    shop.ledger.unconfirmed_deposits.append(_unconfirmed("10.00"))
    shop.resolve_unconfirmed_deposits(shop_settled=True)
    assert shop.ledger.deposited["u1"] == Decimal("100.00")
    problems = _balances({}, {}, {"u1": Decimal("100.00")}, [SHOPPER], shop.ledger)
    assert problems == ["deposit of 10.00 for u1 (key k1, gateway) unconfirmed after the run:"
                        " ReadTimeout"]


def test_only_a_transient_answer_is_asked_again():
    assert all(transient(status) for status in (500, 502, 503, 504, 429, 408, "ConnectionError",
                                                "ReadTimeout"))
    assert not any(transient(status) for status in (200, 400, 401, 404, 409, 422))


def test_a_deposit_refused_is_not_asked_again_and_is_noted(monkeypatch):
    monkeypatch.setattr(load, "DEPOSIT_RETRY_SECONDS", 0.5)
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    tries = []
    shop = _load_answering({"k1": [(422, False)]})
    answer = shop._post
    shop._post = lambda *request: tries.append(request) or answer(*request)
    assert not shop._deposit_confirmed(SHOPPER, Decimal("10.00"), "k1", "gateway")
    assert len(tries) == 1
    assert shop.ledger.unconfirmed_deposits == [
        UnconfirmedDeposit(SHOPPER, Decimal("10.00"), "k1", "gateway", 422)]


class _Clock:
    """time as load.py reads it, each request taking a second and each pause its length."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_sending_the_unconfirmed_deposits_again_takes_one_patience_for_them_all(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(load, "time", clock)
    shop = _load_answering({key: [("ReadTimeout", False)] for key in ("k1", "k2", "k3")})
    answer = shop._post
    shop._post = lambda *request: clock.sleep(1) or answer(*request)
    said = []
    shop.say = said.append
    shop.ledger.unconfirmed_deposits += [_unconfirmed("1.00", key) for key in ("k1", "k2", "k3")]
    shop.resolve_unconfirmed_deposits(shop_settled=True)
    # The deadline passed during k1's tries: one try (a second) and a pause past it at most.
    assert clock.now <= load.RESOLVE_SECONDS + 1 + load.RETRY_PAUSE
    assert [deposit.key for deposit in shop.ledger.unconfirmed_deposits] == ["k1", "k2", "k3"]
    assert said[-1] == (f"2 unconfirmed deposits not sent again: out of time"
                        f" ({load.RESOLVE_SECONDS}s for them all)")


def test_no_deposit_is_sent_again_to_a_shop_that_did_not_settle():
    shop = _load_answering({})  # (a deposit sent would find no answer: a KeyError)
    said = []
    shop.say = said.append
    shop.ledger.unconfirmed_deposits += [_unconfirmed("1.00", "k1"), _unconfirmed("2.00", "k2")]
    shop.resolve_unconfirmed_deposits(shop_settled=False)
    assert [deposit.key for deposit in shop.ledger.unconfirmed_deposits] == ["k1", "k2"]
    assert said == ["2 unconfirmed deposits not sent again: the shop did not settle"]
