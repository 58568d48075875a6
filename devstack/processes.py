"""Start, watch and stop the child processes of the local stack, each in its own process group.

A group is signalled by its leader's pid, so only while that pid is still the child's: the kernel
hands a pid out again once its process is reaped (and no group or session is left with it as
its id), to a process that may lead a group of its own. So a child's exit is seen without reaping
it (os.waitid's WNOWAIT): the ended leader stays a zombie, holding its pid, until stop() has
killed what is left of its group (the workers of a master that died, say) and reaped it. Where
os.waitid is missing (macOS before Python 3.13) the exit is seen as Popen sees it, reaping the
leader: a stop still kills what is left of the group once its leader has ended (as it always did,
a moment after the reap), but a group whose leader died by itself and was reaped then is not
signalled again: what it left runs on.
"""

from __future__ import annotations

import atexit
import os
import pwd
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from devstack.leftovers import RunRecord
from devstack.logs import keep_the_previous_log


# What a process calls as it starts (ManagedProcess.on_start).
OnStart = Callable[["ManagedProcess"], None]
# Whether a child's exit can be seen without reaping it (the module's docstring).
SEES_EXIT_UNREAPED = hasattr(os, "waitid")


def run_as(user: str | None) -> dict:
    """subprocess keyword arguments that run a child as user with that user's own groups.

    `user=` alone would keep root's groups, and root's group bits then deny what other-bits allow.
    """
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class ManagedProcess:
    """One child process in its own session, with stdout and stderr going to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        log_path: str | os.PathLike,
        cwd: str | os.PathLike | None = None,
        *,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        on_start: OnStart | None = None,
    ):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self._popen: subprocess.Popen | None = None
        self._stopped_on_purpose = False
        # Told of each start, as it starts (ProcessGroup.note: a run's record of its processes).
        self.on_start = on_start

    def start(self) -> ManagedProcess:
        """Start the process; the first start writes its log afresh, what was there kept as
        `<log>.1` (devstack.logs), and a restart appends to it (and ends what the previous start
        left of its group)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self._popen is not None:
            self._reap()
        else:
            keep_the_previous_log(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **run_as(self.user),
            )
        self._stopped_on_purpose = False
        if self.on_start is not None:
            self.on_start(self)
        return self

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._exit_status() if self._popen is not None else None

    def alive(self) -> bool:
        return self._popen is not None and self._exit_status() is None

    def died(self) -> bool:
        """True when the process was started and has exited without being asked to stop."""
        return self._popen is not None and not self._stopped_on_purpose and not self.alive()

    def stop(self, timeout: float = 10) -> None:
        """Send the stop signal to the whole process group, wait, then SIGKILL what is left."""
        if self._popen is None:
            return
        self._stopped_on_purpose = True
        if self.alive():
            self._signal_group(self.stop_signal)
            if not self._wait_for_exit(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait_for_exit(None)
            # (Reaped a moment ago, where the exit is seen as Popen sees it: its group is still
            # its own, but for a pid handed out in between, as a stop always risked there.)
            self._reap(reaped_just_now=not SEES_EXIT_UNREAPED)
        else:
            self._reap()

    def kill(self) -> None:
        """SIGKILL the whole process group, waiting for nothing."""
        if self._popen is not None:
            self._stopped_on_purpose = True
            self._signal_group(signal.SIGKILL)

    def _exit_status(self) -> int | None:
        """The leader's exit code (as Popen's returncode: -N for a signal N), None while it runs;
        one that ended is left unreaped where it can be (the module's docstring)."""
        if self._popen.returncode is not None or not SEES_EXIT_UNREAPED:
            return self._popen.poll()
        try:
            ended = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # (reaped by another: SIGCHLD ignored, say) Popen says how
            return self._popen.poll()
        if ended is None:
            return None
        if ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -ended.si_status
        return ended.si_status

    def _wait_for_exit(self, timeout: float | None) -> bool:
        """Whether the leader ended within `timeout` seconds (None: waited for as long as it
        takes), looked at as Popen.wait looks, more and more seldom up to 20 times a second."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self._exit_status() is None:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def _reap(self, reaped_just_now: bool = False) -> None:
        """End an ended leader's group: SIGKILL what it left in it (the workers of a master that
        died, say), then reap the leader, giving its pid back; `reaped_just_now`: the group is
        signalled though its leader was reaped (by the stop under way)."""
        self._signal_group(signal.SIGKILL, even_if_reaped=reaped_just_now)
        self._popen.wait()

    def _signal_group(self, signum: int, even_if_reaped: bool = False) -> None:
        if self._popen.returncode is not None and not even_if_reaped:
            return  # (its leader reaped: the group's id may be another's by now)
        try:
            os.killpg(self._popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"


class ProcessGroup:
    """The processes a program started: stopped in reverse order at exit, on SIGTERM, Ctrl-C or
    the terminal's hangup (each child runs in a session of its own, out of the terminal's reach:
    closing the terminal must stop them too; a signal the program was started to ignore, it
    goes on ignoring). With a `record` (begun), each process is written down in it as it starts,
    and the record ended once all are stopped: a program killed outright (SIGKILL) could stop none,
    and the next to begin the record stops them (devstack.leftovers)."""

    def __init__(self, handle_signals: bool = True, record: RunRecord | None = None,
                 on_signal: Callable[[], None] | None = None):
        self._processes: list[ManagedProcess] = []
        self._record = record
        # Called as the first stop signal comes, before the stop (which may take seconds: the
        # drain, a slow process), for the program to say it is stopping while it stops.
        self._on_signal = on_signal
        # What stop_all calls once it has stopped a process, before it stops the next
        # (when_stopped).
        self._when_stopped: dict[int, Callable[[], None]] = {}
        # A stop under way (stop_all), and a signal come during it: what is left is stopped at
        # once, nothing waited for (the when_stopped hooks skipped).
        self._stopping = False
        self._at_once = False
        # Held while a process is started again (start_again) and as the stop begins, so that a
        # thread restarting a process it killed starts none the stop has passed. Reentrant:
        # stop_all may run in a signal handler of the thread holding it.
        self._starting_again = threading.RLock()
        # The process stop_all is waiting on: a signal that cuts that wait short has it stopped
        # again, with the rest, so that it is killed if it will not end (its port kept otherwise).
        self._being_stopped: ManagedProcess | None = None
        atexit.register(self.stop_all)
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                # A signal the program was started to ignore stays ignored: SIGHUP under nohup,
                # SIGINT in a job a non-interactive shell started in the background (`... &`).
                # Handling it would stop every process and leave the program running, silent.
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._chain_handler(signum)

    def _chain_handler(self, signum: int) -> None:
        previous = signal.getsignal(signum)

        def handler(received, frame):
            if self._stopping:  # a second Ctrl-C: no drain (README: Running it locally)
                self._at_once = True
            elif self._on_signal is not None:
                # Whatever it raises, the stop goes on: a line said on a pipe whose reader died
                # of the same Ctrl-C (BrokenPipeError), a terminal gone with the hangup (EIO), a
                # stream the main thread was writing to (reentrant call) would otherwise skip
                # the stop and the KeyboardInterrupt, and rise in the main thread, where an
                # `except OSError` may swallow it: the Ctrl-C lost, the start going on.
                try:
                    self._on_signal()
                except Exception:
                    pass
            self.stop_all()
            if callable(previous):
                previous(received, frame)
            elif received == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                raise SystemExit(128 + received)

        signal.signal(signum, handler)

    @property
    def processes(self) -> list[ManagedProcess]:
        return list(self._processes)

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self._processes.append(process)
        if self._record is not None and process.on_start is None:
            process.on_start = self.note
            if process.alive():  # (started before it was added, unrecorded)
                self.note(process)
        return process

    def note(self, process: ManagedProcess) -> None:
        """Write `process` down in the record as it starts: for a process started before it is
        added (an embedded server, added once it answers), as its `on_start`."""
        if self._record is not None:
            self._record.note(process.pid, process.stop_signal, process.name)

    def start(self, process: ManagedProcess) -> ManagedProcess:
        self.add(process)
        return process.start()

    def start_again(self, process: ManagedProcess,
                    before_start: Callable[[], None] | None = None) -> bool:
        """Start one of the group's processes again (killed on purpose, or died), unless the group
        is stopping: then False, the process left stopped (stop_all may have passed it).
        `before_start` (its port found free, say) runs just before the start, under the same
        lock, once the group is known not to be stopping: what it raises goes up, the process left
        stopped. Run before that question, its failure would rise in a stop's place (a Ctrl-C's
        KeyboardInterrupt taken over by the error of a start the stop would have refused). A stop
        (stop_all) waits on that lock: the check is to be quick, take no other lock and never
        wait on the stack."""
        with self._starting_again:
            if self._stopping or process not in self._processes:
                return False
            if before_start is not None:
                before_start()
            process.start()
            return True

    def when_stopped(self, process: ManagedProcess, then: Callable[[], None]) -> None:
        """Have stop_all call `then` once it has stopped `process` (one of the group's), before
        it stops the processes started before it; a process stopped by itself calls nothing."""
        self._when_stopped[id(process)] = then

    def _stop_last(self, timeout: float) -> ManagedProcess:
        process = self._being_stopped = self._processes[-1]
        self._processes.pop()
        process.stop(timeout)
        self._being_stopped = None
        return process

    def stop_all(self, timeout: float = 10) -> None:
        """Stop every process, the last started first, each process's when_stopped hook called
        once it is stopped; a signal arriving meanwhile (a second Ctrl-C) has the process being
        stopped killed and what is left stopped, no hook called. Whatever a hook raises, the rest
        are stopped (and its error goes on up)."""
        with self._starting_again:
            self._stopping = True
        if self._being_stopped is not None:
            # A second Ctrl-C cut short the first stop_all's wait on it: killed, not waited for
            # again (that wait, cut short, may hold subprocess's lock on the child).
            self._being_stopped.kill()
            self._being_stopped = None
        # One at a time, each named as it is stopped, so that a second Ctrl-C arriving mid-stop
        # stops none twice and leaves none running.
        try:
            while self._processes:
                process = self._stop_last(timeout)
                then = self._when_stopped.pop(id(process), None)
                if then is not None and not self._at_once:
                    then()
        finally:
            while self._processes:
                self._stop_last(timeout)
            if self._record is not None:
                self._record.end()
