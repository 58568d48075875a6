"""Order intake: sustained POST /orders per second on the orders API, against the bare baseline."""

from __future__ import annotations

from pathlib import Path

from bench.baseline import baseline_process
from bench.cpu_use import read_cpu
from bench.load import LoadSpec, offer_load
from bench.plan import BenchPlan
from bench.shop import wait_until_final, wait_until_idle
from devstack.infra import LOCALHOST, free_port, port_open, wait_for_process
from devstack.processes import ManagedProcess
from devstack.stack import Stack


def measure_intake(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path,
                   extra_processes: list[ManagedProcess]) -> dict:
    """Drive the baseline and the API in turns (baseline, API, baseline, ...), each as fast as it
    answers, so that the machine's drift falls on both alike. Between turns the whole shop settles:
    the work a turn's orders cause, down to the gateway's notifications, is over before the next
    turn starts, and never lands on the other side's figures."""
    port = free_port()
    baseline = baseline_process(port, stack.env, stack.logs_dir)
    extra_processes.append(baseline)
    baseline.start()
    turns: dict[str, list[dict]] = {"baseline": [], "orders_api": []}
    try:
        wait_for_process(baseline, lambda: port_open(LOCALHOST, port), 30, "the baseline API")
        orders_api = next(p for p in stack.processes if p.name == "orders-api")
        servers = {"baseline": (f"http://{LOCALHOST}:{port}/orders", baseline),
                   "orders_api": (f"{stack.orders_url}/orders", orders_api)}
        for round_number in range(plan.intake_rounds):
            for side, (url, server) in servers.items():
                out = workdir / f"intake-{side}-{round_number}"
                turns[side].append(_drive(stack, plan, url, server, users, out))
    finally:
        baseline.stop()
    bare, api = _combined(turns["baseline"]), _combined(turns["orders_api"])
    return {
        "baseline": bare,
        "orders_api": api,
        "ratio": round(api["accepted_per_s"] / bare["accepted_per_s"], 3),
    }


def _drive(stack: Stack, plan: BenchPlan, url: str, server: ManagedProcess, users: list[str],
           out: Path) -> dict:
    before = read_cpu(lambda: [server])
    report = offer_load(LoadSpec(url=url, users=users, duration=plan.intake_seconds,
                                 concurrency=plan.intake_concurrency), out.with_suffix(".json"))
    server_seconds = (read_cpu(lambda: [server]).seconds_by_process[server.name]
                      - before.seconds_by_process[server.name])
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
