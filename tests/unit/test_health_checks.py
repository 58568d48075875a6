"""GET /health's checks are shared by a process's requests (shared.health.SharedChecks): a flood
of them runs one round at a time, one a second at most."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from shared.health import SharedChecks


class SlowChecks:
    """A round of checks that takes as long as the broker's with the broker down, and counts."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds
        self.rounds = 0
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, bool]:
        with self._lock:
            self.rounds += 1
        time.sleep(self.seconds)  # (a slow round: the scenario, not a wait)
        return {"broker": False}


def test_requests_at_once_share_one_round():
    checks, run = SharedChecks(lasts_for=60), SlowChecks()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: checks.get(run), range(8)))
    assert answers == [{"broker": False}] * 8
    assert run.rounds == 1


def test_while_a_round_runs_the_others_get_the_last_answer_at_once():
    checks = SharedChecks(lasts_for=0)
    assert checks.get(lambda: {"broker": True}) == {"broker": True}
    slow = SlowChecks(seconds=1)
    started = threading.Event()

    def round_under_way():
        started.set()
        return slow()

    runner = threading.Thread(target=checks.get, args=(round_under_way,))
    runner.start()
    try:
        assert started.wait(5)
        assert checks.get(SlowChecks()) == {"broker": True}  # the last answer, not a round
    finally:
        runner.join()
    assert slow.rounds == 1
    assert checks.get(lambda: {"broker": True}) == {"broker": True}


def test_an_answer_older_than_its_time_is_checked_again():
    now = [100.0]
    checks, run = SharedChecks(lasts_for=1.0, clock=lambda: now[0]), SlowChecks(seconds=0)
    checks.get(run)
    now[0] += 0.9
    checks.get(run)
    assert run.rounds == 1
    now[0] += 0.2
    checks.get(run)
    assert run.rounds == 2
