"""Order intake: sustained POST /orders per second on the orders API, against the bare baseline,
with the intake floors (bench/floors.py) between them: what each layer of the API's stack costs."""

from __future__ import annotations

from pathlib import Path

from bench.baseline import BASELINE_APP, served_by_gunicorn
from bench.cpu_use import own_cpu_seconds
from bench.floors import FLOORS
from bench.load import LoadSpec, offer_load
from bench.plan import BenchPlan
from bench.shop import wait_until_final, wait_until_idle
from devstack.infra import LOCALHOST, free_port, port_open, wait_for_process, wait_until
from devstack.processes import ManagedProcess
from devstack.stack import Stack


def measure_intake(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path) -> dict:
    """Drive the baseline, the floors and the API in turns, each as fast as it answers, in one
    order and then in the reverse one (baseline, floors, API, API, floors, baseline, ...), so that
    the machine's drift falls on all alike. Between turns the whole shop settles: the work a turn's
    orders cause, down to the gateway's notifications, is over before the next turn starts, and
    never lands on another side's figures."""
    servers: dict[str, tuple[str, ManagedProcess]] = {}  # side -> (URL, serving process)
    started: list[ManagedProcess] = []
    try:
        servers["baseline"] = _serve("baseline-api", BASELINE_APP, stack, started)
        for floor in FLOORS:
            servers[floor.process_name] = _serve(floor.process_name, floor.app, stack, started)
        _wait_until_booted([server for _url, server in servers.values()])
        orders_api = next(p for p in stack.processes if p.name == "orders-api")
        servers["orders_api"] = (f"{stack.orders_url}/orders", orders_api)
        turns: dict[str, list[dict]] = {name: [] for name in servers}
        for round_number in range(plan.intake_rounds):
            sides = list(servers.items())
            for side, (url, server) in sides if round_number % 2 == 0 else reversed(sides):
                out = workdir / f"intake-{side}-{round_number}"
                turns[side].append(_drive(stack, plan, url, server, users, out))
    finally:
        for server in started:
            server.stop()
    bare, api = _combined(turns["baseline"]), _combined(turns["orders_api"])
    floors = []
    for floor in FLOORS:
        figures = _combined(turns[floor.process_name])
        floors.append({"name": floor.process_name, "adds": floor.adds} | figures | {
            "ratio": round(figures["accepted_per_s"] / bare["accepted_per_s"], 3)})
    return {
        "baseline": bare,
        "floors": floors,
        "orders_api": api,
        "ratio": round(api["accepted_per_s"] / bare["accepted_per_s"], 3),
    }


def _serve(name: str, app: str, stack: Stack,
           started: list[ManagedProcess]) -> tuple[str, ManagedProcess]:
    """Start gunicorn serving `app` as the orders API is served, as one of the stack's processes
    (Stack.start_extra: in the run's record, so that a run killed outright has it stopped by the
    next), and add it to `started` for the caller to stop; its URL for POST /orders."""
    port = free_port()
    server = served_by_gunicorn(name, app, port, stack.env, stack.logs_dir)
    started.append(server)
    stack.start_extra(server)
    wait_for_process(server, lambda: port_open(LOCALHOST, port), 30, name)
    return f"http://{LOCALHOST}:{port}/orders", server


# A server counts as booted once two quarters of a second in a row have each added less CPU than
# this to it and its workers (their imports and the app's set-up take about a second of CPU).
_BOOTED_CPU_SECONDS = 0.01


def _wait_until_booted(servers: list[ManagedProcess], timeout: float = 60) -> None:
    """gunicorn opens its port before its workers have imported and built the app: wait until the
    servers just started spend no more CPU, so that their start-up does not fall on the first
    turns (0.2-1.1 s of CPU a server had fallen on the baseline's first turn, which then counted
    108 POST/s against 264 in its second)."""
    readings: list[float] = []  # the servers' CPU seconds, a quarter of a second apart

    def booted() -> bool:
        # (Theirs alone: the machine's PostgreSQL and Redis, busy with other runs' work, with the
        # bench's own shop settling, never count as a server booting.)
        readings.append(sum(own_cpu_seconds(servers).values()))
        last = readings[-3:]
        return len(last) == 3 and all(later - earlier < _BOOTED_CPU_SECONDS
                                      for earlier, later in zip(last, last[1:]))

    wait_until(booted, timeout, interval=0.25, what="the intake servers to boot")


def _drive(stack: Stack, plan: BenchPlan, url: str, server: ManagedProcess, users: list[str],
           out: Path) -> dict:
    before = own_cpu_seconds([server])
    report = offer_load(LoadSpec(url=url, users=users, duration=plan.intake_seconds,
                                 concurrency=plan.intake_concurrency), out.with_suffix(".json"),
                        stack.env)
    server_seconds = own_cpu_seconds([server])[server.name] - before[server.name]
    drained = wait_until_final(stack, report["order_ids"], plan.drain_timeout)
    settled = wait_until_idle(stack, plan.drain_timeout)
    return {
        "accepted_per_s": report["accepted_per_s"],
        "requests": report["requests"],
        "server_cpu_seconds": server_seconds,
        "errors": report["errors"],
        "drained": drained and settled,
        "generator_cpu_percent": report["generator_cpu_percent"],
    }


def _combined(turns: list[dict]) -> dict:
    """One side's turns (all of the same length) as one figure, each turn's rate kept beside it."""
    return {
        "accepted_per_s": round(sum(t["accepted_per_s"] for t in turns) / len(turns), 1),
        "turns_accepted_per_s": [t["accepted_per_s"] for t in turns],
        "requests": sum(t["requests"] for t in turns),
        # The serving processes' CPU (gunicorn and its workers) per request answered.
        "server_cpu_ms_per_request": round(1000 * sum(t["server_cpu_seconds"] for t in turns)
                                           / max(sum(t["requests"] for t in turns), 1), 2),
        "errors": sorted({error for t in turns for error in t["errors"]}),
        "drained": all(t["drained"] for t in turns),
        "generator_cpu_percent": round(
            sum(t["generator_cpu_percent"] for t in turns) / len(turns), 1),
    }
