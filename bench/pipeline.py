"""The whole pipeline under offered load: orders/s reaching a final status, and the latency from
POST /orders to the final status: from the moment the generator was due to send the request (its
schedule, open loop: a request sent late, or left waiting for a server thread, counts that wait)
to the status's time in the order's row (updated_at, set by the handler that settles it)."""

from __future__ import annotations

from pathlib import Path

from bench.cpu_use import cpu_ms_per_order, machine_busy_share, read_cpu
from bench.hops import hop_medians_ms
from bench.load import LoadSpec, offer_load
from bench.plan import BenchPlan
from bench.shop import order_times, status_counts, wait_until_final
from bench.stats import latency_summary_ms
from devstack.stack import Stack

# Threads in the generator: enough that a slow answer never holds back the offered rate.
OPEN_LOOP_CONCURRENCY = 32
FINAL_WITHIN_SECONDS = 1.0


def measure_capacity(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path) -> dict:
    """Offer more than the pipeline is asked to carry and count what reaches a final status per
    second over the window after the warm-up."""
    load = _offer(stack, users, plan.capacity_rate, plan.capacity_seconds, workdir / "capacity")
    drained = wait_until_final(stack, load["order_ids"], plan.drain_timeout)
    times = order_times(stack, load["order_ids"])
    start = min(t.created_at for t in times)
    window_start = start.timestamp() + plan.capacity_warmup_seconds
    window_end = start.timestamp() + plan.capacity_seconds
    final_in_window = sum(1 for t in times if t.seconds_to_final is not None
                          and window_start <= t.updated_at.timestamp() < window_end)
    final_per_s = final_in_window / (window_end - window_start)
    return {
        "offered_rate": plan.capacity_rate,
        "accepted_per_s": load["accepted_per_s"],
        "orders": len(load["order_ids"]),
        "failed": load["failed"],
        "errors": load["errors"],
        "window_seconds": plan.capacity_seconds - plan.capacity_warmup_seconds,
        "final_per_s": round(final_per_s, 1),
        "statuses": status_counts(times),
        "kept_up": final_per_s >= 0.95 * load["accepted_per_s"],
        "drained": drained,
        "generator_cpu_percent": load["generator_cpu_percent"],
    }


def warm_up(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path) -> None:
    """Unmeasured orders through the whole pipeline, so that the first measured one does not
    pay for what a process does only once (pools filling, first queries planned, threads
    started)."""
    load = _offer(stack, users, plan.warmup_rate, plan.warmup_seconds, workdir / "warm-up")
    wait_until_final(stack, load["order_ids"], plan.drain_timeout)


def measure_latency(stack: Stack, plan: BenchPlan, users: list[str], workdir: Path,
                    rate: float) -> dict:
    """Latency POST -> final of every order offered at `rate` for the plan's duration, where that
    time goes (the hops' medians), and the CPU each process spent per order meanwhile."""
    before = read_cpu(lambda: stack.processes)
    load = _offer(stack, users, rate, plan.latency_seconds, workdir / f"latency-{rate:g}")
    after_load = read_cpu(lambda: stack.processes)
    drained = wait_until_final(stack, load["order_ids"], plan.drain_timeout)
    # Read once the orders are final, so that the work on the last of them counts too.
    settled = read_cpu(lambda: stack.processes)
    times = order_times(stack, load["order_ids"])
    due_at = dict(zip(load["order_ids"], load["order_due_at"]))
    to_final = [t.updated_at.timestamp() - due_at[t.order_id] for t in times
                if t.seconds_to_final is not None]
    within = sum(1 for seconds in to_final if seconds <= FINAL_WITHIN_SECONDS)
    # An order the API refused or failed to answer, or was too busy to take (or the generator to
    # send), was not final in time either: the share of offered orders counts it, the share of
    # accepted ones does not. The percentiles leave them out, with the accepted orders not final
    # by the drain's deadline: the row counts each, and the targets hold them against the run
    # (bench.report.orders_left_out).
    offered = max(round(rate * plan.latency_seconds), len(load["order_ids"]), 1)
    return {
        "offered_rate": rate,
        "accepted_per_s": load["accepted_per_s"],
        "orders": len(load["order_ids"]),
        **latency_summary_ms(to_final),
        "final_within_1s": round(within / max(len(load["order_ids"]), 1), 4),
        "offered_final_within_1s": round(within / offered, 4),
        "post_p99_ms": latency_summary_ms([ms / 1000 for ms in load["http_latency_ms"]])["p99_ms"],
        "sent_late_p99_ms": load["sent_late_p99_ms"],
        "unsent": load["unsent"],
        "failed": load["failed"],
        "errors": load["errors"],
        "not_final": len(load["order_ids"]) - len(to_final),
        # (A latency of orders CANCELLED is the cheap path's, not the paid one's: the targets
        # hold any against the run, bench.report.orders_cancelled.)
        "statuses": status_counts(times),
        "drained": drained,
        "generator_cpu_percent": load["generator_cpu_percent"],
        "generator_peak_rss_mb": load["generator_peak_rss_mb"],
        "hops_p50_ms": hop_medians_ms(stack, times, due_at),
        "machine_busy": machine_busy_share(before, after_load),
        "cpu_ms_per_order": cpu_ms_per_order(before, settled, len(load["order_ids"])),
    }


def _offer(stack: Stack, users: list[str], rate: float, seconds: float, out: Path) -> dict:
    return offer_load(LoadSpec(url=f"{stack.orders_url}/orders", users=users, duration=seconds,
                               rate=rate, concurrency=OPEN_LOOP_CONCURRENCY),
                      out.with_suffix(".json"), stack.env)
