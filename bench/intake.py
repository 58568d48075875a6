"""Order intake: sustained POST /orders per second on the orders API, against the bare baseline."""

from __future__ import annotations

from pathlib import Path

from bench.baseline import baseline_process
from bench.load import LoadSpec, offer_load
from bench.plan import BenchPlan
from bench.shop import wait_until_final
from devstack.infra import LOCALHOST, free_port, port_open, wait_for_process
from devstack.processes import ManagedProcess
from devstack.stack import Stack


def measure_intake(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path,
                   extra_processes: list[ManagedProcess]) -> dict:
    """Drive the baseline, then the API, as fast as they answer; the pipeline drains in between."""
    port = free_port()
    baseline = baseline_process(port, stack.env, stack.logs_dir)
    extra_processes.append(baseline)
    baseline.start()
    try:
        wait_for_process(baseline, lambda: port_open(LOCALHOST, port), 30, "the baseline API")
        bare = _drive(stack, plan, f"http://{LOCALHOST}:{port}/orders", users, workdir / "base")
    finally:
        baseline.stop()
    api = _drive(stack, plan, f"{stack.orders_url}/orders", users, workdir / "api")
    return {
        "baseline": bare,
        "orders_api": api,
        "ratio": round(api["accepted_per_s"] / bare["accepted_per_s"], 3),
    }


def _drive(stack: Stack, plan: BenchPlan, url: str, users: list[str], out: Path) -> dict:
    report = offer_load(LoadSpec(url=url, users=users, duration=plan.intake_seconds,
                                 concurrency=plan.intake_concurrency), out.with_suffix(".json"))
    drained = wait_until_final(stack, report["order_ids"], plan.drain_timeout)
    return {
        "accepted_per_s": report["accepted_per_s"],
        "requests": report["requests"],
        "errors": report["errors"],
        "drained": drained,
        "generator_cpu_percent": report["generator_cpu_percent"],
    }
