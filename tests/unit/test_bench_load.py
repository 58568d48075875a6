"""The load generator's own bookkeeping (bench/load.py): what it offered and did not send, and
its own peak memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.load import _Schedule

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_requests_offered_and_never_sent_are_counted():
    schedule = _Schedule(rate=100, duration=2)
    assert schedule.unsent(sent=150) == 50
    assert schedule.unsent(sent=200) == 0
    assert _Schedule(rate=None, duration=2).unsent(sent=7) == 0  # closed loop: nothing owed


def test_the_generators_peak_memory_is_its_own_not_the_runners():
    """The runner holds hundreds of MB (the relay's rows) as it starts the generator."""
    held = bytearray(300 * 1024 * 1024)
    held[::4096] = b"x" * len(held[::4096])  # touched: resident, not only reserved
    answer = subprocess.run(
        [sys.executable, "-c", "from bench.load import _peak_rss_mb; print(_peak_rss_mb())"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=60)
    assert float(answer.stdout) < 150
