"""The chaos soak's check of the orders its requests placed (bench/chaos/invariants.py), on
crafted ledgers and rows: an idempotency double hidden among unrelated lost answers is found; an
order paid or notified other than once, and a balance debited twice, are flagged; and its wait
for the shop to settle, on crafted reads of the databases."""

from __future__ import annotations

from contextlib import contextmanager
from decimal import Decimal

import pytest

import bench.shop
from bench.chaos import invariants
from bench.chaos.invariants import _balances, _orders_and_payments, requests_placed
from bench.chaos.load import Ledger, Request, Shopper


def _ledger(**requests: Request) -> Ledger:
    ledger = Ledger()
    ledger.requests.update(requests)
    for request in requests.values():
        for order_id in request.acknowledged:
            ledger.accepted[order_id] = (request.user, request.amount)
    return ledger


def test_a_keyed_retry_placing_a_second_order_is_found_among_unrelated_lost_answers():
    """Key k's first try committed order A and lost its answer (its API child killed); its retry
    placed order B, answered 202. Two unkeyed tries timed out and placed nothing: a count of
    tries that may have placed an order would have excused A."""
    ledger = _ledger(
        keyed=Request("u1", Decimal("5.00"), ["ConnectionError", 202], {"B"}),
        lost1=Request("u2", Decimal("1.00"), ["ReadTimeout"]),
        lost2=Request("u2", Decimal("2.00"), [504]))
    orders = {"A": ("u1", Decimal("5.00"), "keyed"), "B": ("u1", Decimal("5.00"), "keyed")}
    problems = requests_placed(ledger, orders)
    assert len(problems) == 1 and "request keyed of u1 placed orders ['A', 'B']" in problems[0]


def test_an_order_placed_unanswered_by_a_lost_try_is_no_violation():
    ledger = _ledger(lost=Request("u2", Decimal("1.00"), [502]),
                     keyed=Request("u1", Decimal("5.00"), ["ReadTimeout", 202], {"A"}))
    orders = {"L": ("u2", Decimal("1.00"), "lost"), "A": ("u1", Decimal("5.00"), "keyed")}
    assert requests_placed(ledger, orders) == []


def test_an_order_of_a_try_refused_503_or_4xx_is_a_violation():
    ledger = _ledger(refused=Request("u1", Decimal("1.00"), [503]),
                     conflict=Request("u1", Decimal("2.00"), [409, 409]))
    orders = {"R": ("u1", Decimal("1.00"), "refused"), "C": ("u1", Decimal("2.00"), "conflict")}
    problems = requests_placed(ledger, orders)
    assert len(problems) == 2 and all("never acknowledged" in line for line in problems)


# PostgreSQL crashed at 100 s (time.monotonic()'s) and answering again at 102 s.
CRASH = (100.0, 102.0)


def test_an_order_of_a_try_answered_503_database_unavailable_in_a_crash_is_no_violation():
    """PostgreSQL, crashed by the soak, may fail as the order's transaction commits, having
    committed it: the service answers 503 DATABASE_UNAVAILABLE, the order placed. So for a try in
    flight as it was killed, while it was down, or just after it answered again; another 503
    beside them still excuses nothing."""
    ledger = _ledger(as_killed=_database_failed("1.00", (99, 100.5)),
                     while_down=_database_failed("3.00", (101, 101)),
                     just_after=_database_failed("4.00", (102.3, 102.3)),
                     refused=Request("u1", Decimal("2.00"), [503]))
    orders = {"K": ("u1", Decimal("1.00"), "as_killed"),
              "D": ("u1", Decimal("3.00"), "while_down"),
              "J": ("u1", Decimal("4.00"), "just_after"),
              "R": ("u1", Decimal("2.00"), "refused")}
    problems = requests_placed(ledger, orders, [CRASH])
    assert len(problems) == 1 and problems[0].startswith("order R placed by request refused")


def test_an_order_of_a_try_answered_503_database_unavailable_with_no_crash_about_is_a_violation():
    """A 503 DATABASE_UNAVAILABLE outside PostgreSQL's crashes (before one, or well after it
    answered again) or in a run with none says the service failed before its commit: an order
    stored for it was placed by a try that said it was not."""
    ledger = _ledger(before=_database_failed("1.00", (90, 99.5)),
                     after=_database_failed("3.00", (103, 103.5)))
    orders = {"B": ("u1", Decimal("1.00"), "before"), "A": ("u1", Decimal("3.00"), "after")}
    problems = requests_placed(ledger, orders, [CRASH])
    assert sorted(line.split()[1] for line in problems) == ["A", "B"]
    assert all("never acknowledged" in line for line in problems)
    assert len(requests_placed(ledger, orders)) == 2  # (no crash at all)


def _database_failed(amount: str, tried: tuple[float, float]) -> Request:
    """A request of u1's whose one try, in flight over `tried`, was answered 503
    DATABASE_UNAVAILABLE."""
    return Request("u1", Decimal(amount), [503], database_failed=[tried])


def test_an_acknowledged_order_stored_with_another_user_or_amount_is_a_violation():
    ledger = _ledger(sent=Request("u1", Decimal("5.00"), [202], {"A"}))
    problems = requests_placed(ledger, {"A": ("u1", Decimal("50.00"), "sent")})
    assert problems == ["order A (u1, 50.00) stored for request sent of (u1, 5.00)"]


def test_an_order_of_no_request_sent_is_a_violation():
    problems = requests_placed(Ledger(), {"X": ("u1", Decimal("5.00"), "chaos")})
    assert problems == ["order X (u1, 5.00) of no request sent: 'chaos'"]


SHOPPER = Shopper("u1", "token", "shopper-u1", "a long password")
TEN = Decimal("10.00")


def _one_order_accepted() -> Ledger:
    """u1 deposited 100.00 and had one order of 10.00 accepted, o1."""
    ledger = Ledger()
    ledger.deposited["u1"] = Decimal("100.00")
    ledger.accepted["o1"] = ("u1", TEN)
    return ledger


def test_an_order_finished_paid_and_notified_once_breaks_nothing():
    ledger = _one_order_accepted()
    orders, payments = {"o1": ("u1", TEN, "FINISHED")}, {"o1": ("u1", TEN, "SUCCEEDED")}
    assert _orders_and_payments(orders, payments, {"o1": ["FINISHED"]}, ledger) == []
    assert _balances(orders, payments, {"u1": Decimal("90.00")}, [SHOPPER], ledger) == []


def test_a_balance_debited_twice_for_one_order_is_flagged():
    """The payment row is one, the debit two: the balance is what tells."""
    ledger = _one_order_accepted()
    orders, payments = {"o1": ("u1", TEN, "FINISHED")}, {"o1": ("u1", TEN, "SUCCEEDED")}
    assert _balances(orders, payments, {"u1": Decimal("80.00")}, [SHOPPER], ledger) == [
        "u1's balance 80.00 is not deposited 100.00 less FINISHED 10.00 (debited 10.00)"]


@pytest.mark.parametrize("status, payment, notified, problem", [
    ("FINISHED", ("u1", TEN, "SUCCEEDED"), ["FINISHED", "FINISHED"],
     "order o1 FINISHED notified ['FINISHED', 'FINISHED']"),
    ("FINISHED", ("u1", TEN, "SUCCEEDED"), [], "order o1 FINISHED notified []"),
    ("CANCELLED", ("u1", TEN, "SUCCEEDED"), ["CANCELLED"],
     "CANCELLED order o1 (u1, 10.00) paid: ('u1', Decimal('10.00'), 'SUCCEEDED')"),
    ("FINISHED", ("u1", TEN, "FAILED"), ["FINISHED"],
     "FINISHED order o1 not paid: ('u1', Decimal('10.00'), 'FAILED')"),
    ("NEW", None, [], "order o1 NEW, not final"),
], ids=["notified twice", "never notified", "cancelled but paid", "finished unpaid",
        "not final"])
def test_an_order_paid_or_notified_other_than_once_is_flagged(status, payment, notified,
                                                               problem):
    orders = {"o1": ("u1", TEN, status)}
    payments = {} if payment is None else {"o1": payment}
    problems = _orders_and_payments(orders, payments, {"o1": notified}, _one_order_accepted())
    assert problem in problems, problems


class _Databases:
    """The services' databases as settle() reads them: nothing owed, one FINISHED order, and its
    notification stored once `notified_after` reads of the notifications have come."""

    def __init__(self, notified_after: float):
        self.notified_after, self.notification_reads = notified_after, 0

    @contextmanager
    def cursor(self, _stack, _service):
        yield self

    def execute(self, sql: str, _params=None) -> None:
        self.sql = sql
        if "FROM notifications" in sql:
            self.notification_reads += 1

    def fetchone(self):
        return (0,) * self.sql.count("count(*)")  # nothing unfinished, owed or stored

    def fetchall(self):
        if "FROM notifications" in self.sql:
            notified = self.notification_reads > self.notified_after
            return [("A", "FINISHED")] if notified else []
        return [("A", "FINISHED")]


@pytest.mark.parametrize("notified_after, settled", [(1, True), (float("inf"), False)])
def test_settling_waits_for_every_orders_notification_past_idle(monkeypatch, notified_after,
                                                                 settled):
    """A status record in Kafka is in no outbox or inbox: idle, the order not notified yet."""
    databases = _Databases(notified_after)
    monkeypatch.setattr(bench.shop, "service_cursor", databases.cursor)
    monkeypatch.setattr(invariants, "service_cursor", databases.cursor)
    assert invariants.settle(object(), timeout=3) is settled
