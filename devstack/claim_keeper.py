"""The run's claim on its databases kept on a thread of its own (devstack.database_claim's keep):
a PostgreSQL that does not answer, or answers no more (frozen: SIGSTOP, `docker pause`), holds
up that thread only, not the supervisor's (which follows the logs and starts dead processes
again), nor Ctrl-C, nor the run's stop (DatabaseClaim.release does not wait for it either).
"""

from __future__ import annotations

import queue
import threading

from devstack.database_claim import DatabaseClaim, Kept


class ClaimKeeper:
    """Keeps `claim` (DatabaseClaim.keep) on a daemon thread, one look each time it is asked
    (ask) while none is under way; what each found is taken by `found`."""

    def __init__(self, claim: DatabaseClaim):
        self.claim = claim
        self._asked = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._found: queue.SimpleQueue[Kept | Exception] = queue.SimpleQueue()
        threading.Thread(target=self._keep, name="claim keeper", daemon=True).start()

    def ask(self) -> None:
        """Have the claim looked at, unless a look is still under way (it says when it ends)."""
        if self._idle.is_set():
            self._idle.clear()
            self._asked.set()

    def found(self) -> list[Kept | Exception]:
        """What the looks ended since the last call found, oldest first, waiting for none: a
        Kept, or what keep raised (DatabasesInUse: another run took the claim)."""
        found = []
        while True:
            try:
                found.append(self._found.get_nowait())
            except queue.Empty:
                return found

    def wait_idle(self, timeout: float) -> bool:
        """Whether the look under way, if any, ends within `timeout` seconds."""
        return self._idle.wait(timeout)

    def _keep(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            try:
                self._found.put(self.claim.keep())
            except Exception as exc:  # (raised on the supervisor's thread: found)
                self._found.put(exc)
            self._idle.set()
