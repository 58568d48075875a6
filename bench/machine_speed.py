"""How fast this machine runs Python right now: the CPU time a fixed pure-Python loop takes.

These machines change speed over a day (the same code and load have measured 30% apart within an
hour), so each report states the loop's time at the start and at the end of its run. It is one
sign only: it sees the CPU, not the disk (commits wait for it) or other guests competing for the
host, and runs whose loop times matched have still differed. Compare code by runs made back to
back, in turns.
"""

from __future__ import annotations

import time

LOOP_ITERATIONS = 3_000_000


def python_loop_ms() -> float:
    """Milliseconds of CPU the fixed loop takes (lower is faster), best of three."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        total = 0
        for i in range(LOOP_ITERATIONS):
            total += i * i % 7
        best = min(best, time.process_time() - started)
    return round(best * 1000)
