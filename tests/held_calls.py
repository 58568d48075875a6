"""A call a test holds up: the first call of a function, made to take its time, as a slow
process or a lock would, while the test does something else meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any


def first_call_held(monkeypatch: Any, owner: Any, name: str, seconds: float) -> threading.Event:
    """`owner.name` replaced (for the test, by `monkeypatch`) by one whose first call sets the
    event returned and then sleeps `seconds` before it does its work; every later call does its
    work at once."""
    work, begun = getattr(owner, name), threading.Event()

    def held_at_its_work(*args: Any, **kwargs: Any) -> Any:
        if not begun.is_set():
            begun.set()
            time.sleep(seconds)  # (the work taking its time: the scenario, not a wait)
        return work(*args, **kwargs)

    monkeypatch.setattr(owner, name, held_at_its_work)
    return begun
