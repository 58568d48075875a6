"""The run's few lines: what was offered and disrupted, how the orders ended, each broken
invariant."""

from __future__ import annotations

from bench.chaos.load import SIGN_IN_AGAIN
from bench.chaos.plan import ChaosPlan
from bench.chaos.soak import ChaosResult

# Problems listed in full up to this many; the rest counted (one bug may break thousands).
PROBLEMS_SHOWN = 30


def report_lines(plan: ChaosPlan, result: ChaosResult) -> list[str]:
    disrupted = ", ".join(f"{kind} {n}" for kind, n in sorted(result.disruptions.items()))
    signed_in = ", ".join(f"{kind.removeprefix(SIGN_IN_AGAIN)} {n}"
                          for kind, n in sorted(result.answers.items())
                          if kind.startswith(SIGN_IN_AGAIN))
    lines = [
        f"chaos seed {plan.seed}: {result.seconds:.0f}s at {plan.rate:g}/s,"
        f" scaled out: {'yes' if plan.scale_out else 'no'}",
        f"offered {result.offered} (orders and deposits), orders accepted {result.accepted};"
        f" stored {sum(result.orders.values())}: "
        + ", ".join(f"{status} {n}" for status, n in sorted(result.orders.items())),
        f"disruptions {sum(result.disruptions.values())}: {disrupted}",
        f"settled: {'yes' if result.settled else 'no'}",
        f"the load's shoppers' sign-ins again (a token expired): {signed_in or 'none'}",
        f"notification sockets of {plan.socket_users} shoppers: "
        + ", ".join(f"{kind} {n}" for kind, n in sorted(result.sockets.items())),
    ]
    lines += [f"VIOLATION {problem}" for problem in result.problems[:PROBLEMS_SHOWN]]
    if len(result.problems) > PROBLEMS_SHOWN:
        lines.append(f"... and {len(result.problems) - PROBLEMS_SHOWN} more")
    lines.append(f"{len(result.problems)} invariant violations"
                 if result.problems else "no invariant violated")
    return lines
