"""A latency run's row (bench/pipeline.py), from a crafted load and crafted order times: what its
percentiles leave out is counted in it."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench import pipeline
from bench.cpu_use import CpuReading
from bench.plan import FULL
from bench.shop import OrderTimes

START = 1_800_000_000.0
RATE = 100
ORDERS = 1800  # of the 2,000 offered: 200 got a 503 or a 504


def _load(*_args) -> dict:
    """bench.load's report of a run at 100/s for 20 s whose 200 failed requests made no order."""
    return {"accepted_per_s": 90.0,
            "order_ids": [f"00000000-0000-0000-0000-{n:012d}" for n in range(ORDERS)],
            "order_due_at": [START + n / RATE for n in range(ORDERS)],
            "http_latency_ms": [5.0] * ORDERS, "sent_late_p99_ms": 1.0, "unsent": 0,
            "failed": 200, "errors": ["503", "504"], "generator_cpu_percent": 3.0,
            "generator_peak_rss_mb": 60.0}


def _order_times(_stack, order_ids: list[str]) -> list[OrderTimes]:
    """Every order final 40 ms after it was due but one in fifty, left NEW."""
    times = []
    for n, order_id in enumerate(order_ids):
        due = datetime.fromtimestamp(START + n / RATE, timezone.utc)
        status = "NEW" if n % 50 == 0 else "FINISHED"
        times.append(OrderTimes(order_id, status, due, due + timedelta(milliseconds=40)))
    return times


def _latency_row(monkeypatch, *, drained: bool, order_times=_order_times) -> dict:
    """The row of a latency run of _load's load, its orders' times `order_times`'s, all of them
    final within the run's wait where `drained`."""
    monkeypatch.setattr(pipeline, "_offer", _load)
    monkeypatch.setattr(pipeline, "wait_until_final", lambda *args: drained)
    monkeypatch.setattr(pipeline, "order_times", order_times)
    monkeypatch.setattr(pipeline, "read_cpu", lambda processes: CpuReading(Counter(), 0.0, 1.0))
    monkeypatch.setattr(pipeline, "hop_medians_ms", lambda *args: {})
    return pipeline.measure_latency(None, FULL, [], Path("unused"), RATE)


def test_a_latency_run_counts_its_failed_requests_and_its_orders_never_final(monkeypatch):
    row = _latency_row(monkeypatch, drained=False)

    assert row["orders"] == ORDERS and row["p99_ms"] == 40.0 and row["drained"] is False
    assert row["failed"] == 200 and row["errors"] == ["503", "504"]
    assert row["not_final"] == ORDERS // 50
    assert row["offered_final_within_1s"] == round((ORDERS - ORDERS // 50) / 2000, 4)


def test_a_latency_run_counts_its_orders_by_status(monkeypatch):
    """Paid (FINISHED) and cancelled alike are final: the row says how many of each."""
    def some_cancelled(stack, order_ids):
        return [t if n % 3 else OrderTimes(t.order_id, "CANCELLED", t.created_at, t.updated_at)
                for n, t in enumerate(_order_times(stack, order_ids))]

    row = _latency_row(monkeypatch, drained=True, order_times=some_cancelled)

    statuses = Counter("CANCELLED" if n % 3 == 0 else "NEW" if n % 50 == 0 else "FINISHED"
                       for n in range(ORDERS))
    assert row["statuses"] == dict(sorted(statuses.items()))
