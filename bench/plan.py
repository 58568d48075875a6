"""How long and how hard each measurement runs: the full benchmark and `make test`'s smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchPlan:
    shoppers: int = 50
    intake_seconds: float = 5  # a turn; baseline, floors and API take `intake_rounds` each
    intake_rounds: int = 2
    intake_concurrency: int = 12
    relay_rows: int = 100_000
    relay_rounds: int = 2  # turns of the relay and of the raw producer each
    capacity_rate: float = 400
    capacity_seconds: float = 70
    capacity_warmup_seconds: float = 10  # left out of the window, so the rate is a sustained one
    latency_rates: tuple[float, ...] = (50, 100, 200)
    warmup_rate: float = 50  # unmeasured orders before the latency runs
    warmup_seconds: float = 5
    latency_seconds: float = 20
    drain_timeout: float = 180
    # Gateway over gRPC against HTTP: per endpoint, `gateway_rounds` turns of each transport.
    gateway_shoppers: int = 20
    gateway_concurrency: int = 12
    gateway_seconds: float = 6
    gateway_rounds: int = 3


FULL = BenchPlan()
SMOKE = BenchPlan(shoppers=2, intake_seconds=1, intake_rounds=1, intake_concurrency=2,
                  relay_rows=200, capacity_rate=20, capacity_seconds=2, capacity_warmup_seconds=0.5,
                  latency_rates=(10,), latency_seconds=1, warmup_seconds=0.5, drain_timeout=30,
                  gateway_shoppers=2, gateway_concurrency=2, gateway_seconds=1, gateway_rounds=1)
