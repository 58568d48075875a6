"""A thread a test starts and then checks: what its target returned or raised is kept, for the
test to see once the thread has ended. (A plain thread's exception is only printed, pytest making
it a warning, and what its target returned is lost: a test checking what the thread left behind
passed with the thread failed.)"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any


class OutcomeThread(threading.Thread):
    """`target(*args)` in a thread; `joined` waits for it, fails if it is still running, raises
    what it raised and returns what it returned."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str | None = None,
                 daemon: bool | None = None) -> None:
        super().__init__(name=name, daemon=daemon)
        self._call = functools.partial(target, *args)
        self._returned: Any = None
        self._raised: BaseException | None = None

    def run(self) -> None:
        try:
            self._returned = self._call()
        except BaseException as exc:  # noqa: BLE001 (raised again by joined, in the test)
            self._raised = exc

    def joined(self, timeout: float) -> Any:
        """What the target returned, once the thread ends (within `timeout` seconds)."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout} s"
        if self._raised is not None:
            raise self._raised
        return self._returned


def all_joined(threads: list[OutcomeThread], timeout: float) -> list[Any]:
    """What each of `threads` returned, once all have ended (each waited for up to `timeout`
    seconds): every one is waited for before any is judged, so that one failing leaves none of
    the others running into the next test; then fails, or raises, as the first that did."""
    for thread in threads:
        thread.join(timeout)
    return [thread.joined(0) for thread in threads]
