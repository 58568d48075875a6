"""`python -m bench.latency_only LABEL`: the benchmark's latency runs alone, on a stack of their own
(seeded, warmed up, then 50, 100 and 200 orders/s as `make bench` offers them), printed as one
JSON line: for telling two versions of the code apart, in runs interleaved on one machine (A, B,
A, B, ...), where one full run of each is one draw of a noisy machine (bench/FINDINGS.md, stop 34).
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import json
import time
from pathlib import Path

from bench.plan import FULL, SMOKE, BenchPlan
from bench.runner import measure_latencies
from bench.shop import running_bench_stack, say, seed_shoppers
from devstack.stack import Stack

# What each rate's line keeps of measure_latency's figures.
KEPT = ("offered_rate", "orders", "unsent", "failed", "errors", "not_final", "drained", "p50_ms",
        "p95_ms", "p99_ms", "final_within_1s", "offered_final_within_1s", "hops_p50_ms",
        "machine_busy", "cpu_ms_per_order")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_only", description=__doc__)
    parser.add_argument("label", help="names the run in its line (the code's version, say)")
    parser.add_argument("--smoke", action="store_true", help="tiny loads, a second each")
    args = parser.parse_args(argv)
    with running_bench_stack(say) as stack:
        line = latency_line(stack, SMOKE if args.smoke else FULL, args.label,
                            stack.run_dir / "load")
    print(json.dumps(line))
    return 0


def latency_line(stack: Stack, plan: BenchPlan, label: str, workdir: Path) -> dict:
    """The latency runs on `stack`, freshly started: its shoppers seeded, then measure_latencies."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results: dict = {}
    workdir.mkdir(parents=True, exist_ok=True)
    users = seed_shoppers(stack, plan.shoppers)
    latencies = measure_latencies(stack, plan, users, workdir, results, say)
    return {"label": label, "started": started,
            "unsettled_before": results.get("unsettled_before", []),
            "latency": [{key: run.get(key) for key in KEPT} for run in latencies]}


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
