"""Where the CPU goes while the pipeline carries a load: the CPU time of each process of the stack
(with its children) and of the PostgreSQL and Redis servers it uses, and how busy the whole
machine was, read with psutil before and after (in the kernel's 10 ms ticks: the figures of a run
of a few orders, as the smoke run's, are coarse)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from devstack.processes import ManagedProcess

# Servers the stack uses but does not start as processes of its own (on this machine they are the
# system's; the embedded fallbacks run under the same names).
SERVER_GROUPS = {"postgres": "PostgreSQL", "redis-server": "Redis"}


@dataclass(frozen=True)
class CpuReading:
    seconds_by_process: Counter
    machine_busy_seconds: float
    machine_total_seconds: float


def read_cpu(processes: Callable[[], list[ManagedProcess]]) -> CpuReading:
    seen: set[int] = set()
    by_process = own_cpu_seconds(processes(), seen)
    for server in psutil.process_iter(["name"]):
        group = SERVER_GROUPS.get(server.info["name"] or "")
        if group and server.pid not in seen:
            by_process[group] += _cpu_seconds(server)
    machine = psutil.cpu_times()
    total = sum(machine)
    return CpuReading(by_process, total - machine.idle - getattr(machine, "iowait", 0.0), total)


def own_cpu_seconds(processes: list[ManagedProcess], seen: set[int] | None = None) -> Counter:
    """The CPU seconds of each of `processes` with its children, by name, and of nothing else:
    not the machine's PostgreSQL and Redis, which other runs share (`seen` is told each pid
    counted)."""
    by_process: Counter = Counter()
    for process in processes:
        if not process.alive():
            continue
        try:
            leader = psutil.Process(process.pid)
            family = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            continue
        for member in family:
            by_process[process.name] += _cpu_seconds(member)
            if seen is not None:
                seen.add(member.pid)
    return by_process


def cpu_ms_per_order(before: CpuReading, after: CpuReading, orders: int) -> dict[str, float]:
    """CPU milliseconds per order of each process between two readings, busiest first."""
    per_order = {name: 1000 * (seconds - before.seconds_by_process.get(name, 0.0)) / max(orders, 1)
                 for name, seconds in after.seconds_by_process.items()}
    return {name: round(ms, 2) for name, ms in sorted(per_order.items(), key=lambda i: -i[1])
            if ms >= 0.005}


def machine_busy_share(before: CpuReading, after: CpuReading) -> float:
    """The share of all the machine's CPUs' time that was busy between two readings."""
    total = after.machine_total_seconds - before.machine_total_seconds
    busy = after.machine_busy_seconds - before.machine_busy_seconds
    return round(busy / total, 3) if total > 0 else 0.0


def _cpu_seconds(process: psutil.Process) -> float:
    """The CPU time of `process` and of its children it has reaped: a PostgreSQL backend that ends
    between two readings (a connection closed) takes its time out of the listing, and the
    postmaster's reaped children's time puts it back, so that a server's total never goes down
    (it went negative, and out of the report, while other clients' connections ended). A child
    still running is listed on its own, its time in no parent's yet."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0  # it exited between the listing and the read
    return times.user + times.system + times.children_user + times.children_system
