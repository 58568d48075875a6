"""What `make run` does when one of its processes exits by itself (README: The two commands).

A process that keeps nothing (an API, a gRPC server, a worker, beat, Flower) is started again,
saying which died, how, and the last lines of its log, unless it keeps dying: then the run stops.
A server the run's data is in (the Kafka broker, the PostgreSQL or Redis the run started) is not
started again: the run stops, saying why.

The run's claim on its databases (devstack.database_claim) is looked at every CLAIM_LOOK_SECONDS,
on a thread of its own (devstack.claim_keeper): gone with its connection (PostgreSQL restarted
under the run), it is taken again, or, another run having taken it meanwhile, the run stops,
naming that run. A look that does not end (a PostgreSQL frozen) holds up none of the others.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable

from devstack.claim_keeper import ClaimKeeper
from devstack.database_claim import DatabaseClaim, DatabasesInUse, Kept
from devstack.processes import ManagedProcess
from devstack.stack import Stack

# A process that dies this many times within DEATHS_WINDOW_SECONDS stops the run: starting it
# again would only hide what kills it (a mistake in the code, a setting, memory).
DEATHS_TO_GIVE_UP = 3
DEATHS_WINDOW_SECONDS = 60
# How much of a dead process's log is said with its death.
LOG_LINES_SAID = 10
# Why the run stops when a server of its own dies, rather than start it again.
WHY_A_SERVER_STOPS_THE_RUN = {
    "broker": "the Kafka broker keeps its messages in memory only: those it held are lost,"
              " and one started again, empty, would hide that",
}
WHY_ANY_OTHER_SERVER_STOPS_THE_RUN = (
    "the run's data is in it: every process lost its connections to it, and one started again"
    " under them would hide what stopped it")
# How often the claim is looked at (one query on its connection): a second checkout's run may take
# it in the gap between a restart and the next look.
CLAIM_LOOK_SECONDS = 2


class RunMustStop(Exception):
    """A death the run does not outlive; its message says which process died and why the run
    stops."""


class Supervisor:
    """Looks after the processes of a started `stack`, and its `claim` if it holds one: each look
    (look()) deals with those that exited by themselves since the last, starting them again or
    raising RunMustStop, then with what the looks at the claim found since (_keep_the_claim),
    asking for another if its time has come (claim_keeper: they run on a thread of their
    own)."""

    def __init__(self, stack: Stack, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic,
                 claim: DatabaseClaim | None = None):
        self._stack = stack
        self._say = say
        self._clock = clock
        self._deaths: dict[str, deque[float]] = {}
        self.claim_keeper = ClaimKeeper(claim) if claim is not None else None
        self._next_claim_look = clock() + CLAIM_LOOK_SECONDS
        self._claim_out_of_reach = False  # (said once, until it is taken again)

    def look(self) -> None:
        for process in self._stack.processes:
            if process.died():
                self._deal_with(process)
        if self.claim_keeper is not None:
            for found in self.claim_keeper.found():
                self._keep_the_claim(found, self.claim_keeper.claim)
            if self._clock() >= self._next_claim_look:
                self.claim_keeper.ask()
                self._next_claim_look = self._clock() + CLAIM_LOOK_SECONDS

    def _keep_the_claim(self, kept: Kept | Exception, claim: DatabaseClaim) -> None:
        """Deal with what a look at the claim (DatabaseClaim.keep) found: say once that it could
        not be kept while PostgreSQL does not answer (its processes fail meanwhile, saying so in
        their logs), and when it is taken again; RunMustStop where another run took it."""
        if isinstance(kept, DatabasesInUse):
            raise RunMustStop(str(kept)) from kept
        if isinstance(kept, Exception):
            raise kept
        if kept is Kept.OUT_OF_REACH and not self._claim_out_of_reach:
            self._say(f"lost the run's claim on {claim.what}: PostgreSQL does not answer"
                      f" (restarting?); taking it again once it does")
        elif kept is Kept.TAKEN_AGAIN:
            self._say(f"claimed {claim.what} again: the claim's connection was gone"
                      f" (PostgreSQL restarted?)")
        self._claim_out_of_reach = kept is Kept.OUT_OF_REACH

    def _deal_with(self, process: ManagedProcess) -> None:
        died = f"{process.name} exited with code {exit_code(process.returncode)}"
        if process in self._stack.holding_data:
            why = WHY_A_SERVER_STOPS_THE_RUN.get(process.name, WHY_ANY_OTHER_SERVER_STOPS_THE_RUN)
            raise RunMustStop(f"{died}: stopping the run, not starting it again ({why})"
                              f"{last_lines(process)}")
        if self._dying_too_often(process.name):
            raise RunMustStop(f"{died}, {DEATHS_TO_GIVE_UP} deaths within"
                              f" {DEATHS_WINDOW_SECONDS} s: stopping the run{last_lines(process)}")
        self._say(f"{died}: starting it again{last_lines(process)}")
        try:
            self._stack.start_again(process)
        except OSError as exc:  # (its executable gone, no memory left to fork: ENOMEM, EAGAIN)
            raise RunMustStop(f"{process.name} could not be started again: {exc}") from exc

    def _dying_too_often(self, name: str) -> bool:
        """Count a death of the process `name`: whether it is the DEATHS_TO_GIVE_UP-th within
        DEATHS_WINDOW_SECONDS."""
        now = self._clock()
        deaths = self._deaths.setdefault(name, deque())
        deaths.append(now)
        while deaths[0] <= now - DEATHS_WINDOW_SECONDS:
            deaths.popleft()
        return len(deaths) >= DEATHS_TO_GIVE_UP


def exit_code(returncode: int) -> str:
    """A process's exit code as Popen gives it (-N for a signal N), the signal named."""
    if returncode < 0:
        try:
            return f"{returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return str(returncode)


def last_lines(process: ManagedProcess) -> str:
    """The last LOG_LINES_SAID lines of the process's log, each on a line of its own, indented
    (nothing if it wrote none)."""
    tail = process.log_tail(LOG_LINES_SAID).splitlines()
    if not tail:
        return f"; its log {process.log_path} is empty"
    return f"; the last lines of {process.log_path}:" + "".join(f"\n    {line}" for line in tail)
