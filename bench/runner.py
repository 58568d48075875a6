"""Runs every measurement against a started stack, in an order that keeps them from disturbing
each other (the whole shop settles before each), and gathers the results."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

from bench.gateway_transports import measure_gateway_transports
from bench.intake import measure_intake
from bench.machine_speed import python_loop_ms
from bench.memory import PeakMemory
from bench.pipeline import measure_capacity, measure_latency, warm_up
from bench.plan import BenchPlan
from bench.relay_speed import measure_relay_speed
from bench.report import describe_run
from bench.servers import server_versions
from bench.shop import seed_shoppers, wait_until_idle
from devstack.stack import Stack


def run_benchmark(stack: Stack, plan: BenchPlan, workdir: Path, say=lambda message: None) -> dict:
    """Every measurement's figures, in `results`' sections. A measurement that fails ends the run
    there, the figures measured before it kept: the results say so (`incomplete`: the section
    that failed, its error and the sections never measured), for the report to say."""
    workdir.mkdir(parents=True, exist_ok=True)
    results = describe_run(plan, server_versions(stack))
    results["machine"]["python_loop_ms"] = {"start": python_loop_ms()}
    users: list[str] = []

    def relay() -> dict:
        users.extend(seed_shoppers(stack, plan.shoppers))
        say(f"relay speed ({plan.relay_rows} rows)...")
        return measure_relay_speed(stack, plan.relay_rows, plan.relay_rounds)

    def intake() -> dict:
        _settle(stack, plan, results, "intake")
        say("order intake against the bare baseline...")
        return measure_intake(stack, plan, users, workdir)

    def capacity() -> dict:
        _settle(stack, plan, results, "capacity")
        say(f"pipeline capacity at {plan.capacity_rate:g} orders/s offered...")
        return measure_capacity(stack, plan, users, workdir)

    def gateway_transports() -> dict:
        _settle(stack, plan, results, "gateway transports")
        say("gateway over gRPC against HTTP...")
        return measure_gateway_transports(stack, plan, workdir)

    # (The intake servers and the gateways it adds are the stack's processes too: start_extra.)
    with PeakMemory(lambda: stack.processes) as memory:
        # The latency runs come before the runs that put tens of thousands of messages through
        # the shop's topics: the test broker (Tansu, in memory) lists every batch a partition
        # holds on each fetch, so its CPU per order grows with all it has taken (Apache Kafka's
        # does not): at 50 orders/s it spent 3.3-4.4 ms of CPU per order on fresh stacks, and
        # 9.5-11.6 ms in the runs that came after the capacity run.
        measure_sections(results, [
            ("relay", relay),
            ("latency", lambda: measure_latencies(stack, plan, users, workdir, results, say)),
            ("intake", intake),
            ("capacity", capacity),
            ("gateway_transports", gateway_transports),
        ], say)
    results["peak_rss_mb"] = memory.peaks_mb()
    results["machine"]["python_loop_ms"]["end"] = python_loop_ms()
    return results


def measure_sections(results: dict, sections: list[tuple[str, Callable[[], object]]],
                     say=lambda message: None) -> None:
    """Measure each section in turn into `results[name]`. The first that fails (an Exception) ends
    the measuring: `results["incomplete"]` names it, its error and the sections left unmeasured,
    and the traceback goes to stderr; the sections measured before it keep their figures."""
    for index, (name, measure) in enumerate(sections):
        try:
            results[name] = measure()
        except Exception as exc:
            traceback.print_exc()
            results["incomplete"] = {
                "failed": name,
                "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                "not_measured": [later for later, _measure in sections[index + 1:]],
            }
            say(f"{name} failed ({type(exc).__name__}): the report keeps the figures measured"
                " before it, marked incomplete")
            return


def measure_latencies(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path,
                      results: dict, say=lambda message: None) -> list[dict]:
    """The warm-up, then the latency at each of the plan's rates, the shop settled before each."""
    say("warming up...")
    warm_up(stack, plan, users, workdir)
    latencies = []
    for rate in plan.latency_rates:
        _settle(stack, plan, results, f"latency at {rate:g}/s")
        say(f"latency at {rate:g} orders/s...")
        latencies.append(measure_latency(stack, plan, users, workdir, rate))
    return latencies


def _settle(stack: Stack, plan: BenchPlan, results: dict, before: str) -> None:
    """Wait for the work the last measurement caused (notifications included) to be over, so it
    does not fall on the next one; a measurement that started on a busy shop is named."""
    if not wait_until_idle(stack, plan.drain_timeout):
        results.setdefault("unsettled_before", []).append(before)
