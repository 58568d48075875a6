"""`make chaos` (python -m bench.chaos): the soak on a stack of its own, a short report on stdout,
exit 1 if any invariant was broken. Options by flag or by environment variable (CHAOS_SEED,
CHAOS_SECONDS, CHAOS_RATE, CHAOS_SCALE), as `make chaos CHAOS_SEED=3` passes them."""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import os
import sys

from bench.chaos.plan import ChaosPlan
from bench.chaos.report import report_lines
from bench.chaos.soak import run_chaos
from bench.shop import running_bench_stack


def say(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=int(env("CHAOS_SEED", "1")))
    parser.add_argument("--seconds", type=float, default=float(env("CHAOS_SECONDS", "150")),
                        help="of load and disruptions (at least until each kind came once)")
    parser.add_argument("--rate", type=float, default=float(env("CHAOS_RATE", "40")),
                        help="orders and deposits offered per second")
    parser.add_argument("--scale", type=int, choices=(0, 1), default=int(env("CHAOS_SCALE", "1")),
                        help="1: a second orders and payments worker, disrupted too")
    args = parser.parse_args(argv)
    plan = ChaosPlan(seed=args.seed, seconds=args.seconds, rate=args.rate,
                     scale_out=bool(args.scale))
    # (a Redis and a PostgreSQL the soak restarts)
    with running_bench_stack(say, own_redis=True, own_postgres=True) as stack:
        result = run_chaos(stack, plan, say)
    print("\n".join(report_lines(plan, result)))
    return 1 if result.problems else 0


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
