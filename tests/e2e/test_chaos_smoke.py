"""The chaos soak (bench.chaos, `make chaos`), run briefly so that it cannot rot and so that every
`make test` has the shop's processes killed under load once: orders and deposits offered at a
modest rate while each kind of process is SIGKILLed or SIGSTOPped in turn, every two seconds or
so, Redis too (the stack's own, restarted empty) and PostgreSQL (the stack's own, crashed and
restarted), and then exactly once holds in the databases.
It asserts the invariants, that the disruptions happened and that the followed shoppers' sockets
opened and were sent notifications, never how many orders finished or how fast.

On a stack of its own, with a Redis and a PostgreSQL of its own: its processes are killed, and
the package's stack's and the session's servers must not be."""

from __future__ import annotations

import pytest

from bench.chaos.plan import ChaosPlan
from bench.chaos.report import report_lines
from bench.chaos.soak import run_chaos
from tests.e2e.conftest import stack_of_its_own

LAYER = "chaos"
# Each of the 17 kinds once, one every 1.5 to 2 s: some 31 s of load. No second workers (the
# soak's scale-out): the machine running the suite may have two cores.
PLAN = ChaosPlan(seed=7, seconds=20, rate=8, users=12, late_users=3, scale_out=False,
                 kill_every=(1.5, 2), restart_after=(0, 0.5), pause_seconds=(2, 8),
                 broker_pause_seconds=(1, 3), redis_down_seconds=(0.5, 1.5),
                 postgres_down_seconds=(0.5, 1.5),
                 settle_seconds=180, socket_users=4)


@pytest.fixture(scope="module")
def shop(infrastructure, run_dir):
    shop = stack_of_its_own(infrastructure, run_dir, LAYER, own_redis=True, own_postgres=True)
    shop.start()
    yield shop
    shop.stop()


def test_exactly_once_holds_with_every_kind_of_process_killed_under_load(shop):
    said = []
    result = run_chaos(shop, PLAN, said.append)
    report = "\n".join(report_lines(PLAN, result) + ["", "what the run said:", *said[-40:]])
    if result.problems:
        pytest.fail(report, pytrace=False)
    assert result.settled, report
    assert set(result.disruptions) == set(PLAN.disruptions()), report
    assert result.accepted > 0 and result.orders, report
    # (The sockets' invariant holds of followers that did nothing too.)
    assert result.sockets["opened"] > 0 and result.sockets["received"] > 0, report
