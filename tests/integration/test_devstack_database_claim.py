"""make run's claim on its databases kept while it runs (devstack.database_claim, looked at by
devstack.supervision), against an embedded PostgreSQL of the test's own, restarted under it.

A restart ends the claim's connection, and PostgreSQL lets go of the lock with it: nothing
noticed, and a second checkout's run then claimed the same databases while the first still ran
on them, the clobbering the claim is there to prevent.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import devstack.__main__ as make_run

from devstack.database_claim import DatabaseClaim, DatabasesInUse
from devstack.infra import free_port, start_embedded_postgres
from devstack.stack import Stack
from devstack.supervision import CLAIM_LOOK_SECONDS, RunMustStop, Supervisor

FIRST, SECOND = "/checkouts/first", "/checkouts/second"


class _RunLooking:
    """A run holding `claim`, its supervisor looking on as make run's does, each look (look())
    once its time has come; what it says in `said`."""

    def __init__(self, claim: DatabaseClaim, run_dir: Path):
        self.said: list[str] = []
        self._now = 0.0
        self._supervisor = Supervisor(Stack(run_dir), self.said.append,
                                      clock=lambda: self._now, claim=claim)

    def look(self) -> None:
        self._now += CLAIM_LOOK_SECONDS
        self._supervisor.look()


class _Server:
    """An embedded PostgreSQL of the test's own on `port`, data in `server_dir`: stopped,
    started again, restarted on that port."""

    def __init__(self, server_dir: Path, port: int):
        self._dir, self._port = server_dir, port
        self.base, self._process = start_embedded_postgres(server_dir, port)

    def stop(self) -> None:
        self._process.stop()

    def start(self) -> None:
        base, self._process = start_embedded_postgres(self._dir, self._port)
        assert base == self.base

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def postgres(server_dir) -> Iterator[_Server]:
    server = _Server(server_dir, free_port())
    try:
        yield server
    finally:
        server.stop()


class _CutShort(Exception):
    """What stops a make run that does not stop by itself in a test's time (_cut_short_after)."""


@contextmanager
def _cut_short_after(seconds: float) -> Iterator[None]:
    """_CutShort raised in the block (in the main thread) if it is still running after
    `seconds`: a make run that does not stop by itself would run on for good."""
    def cut_short(signum, frame):
        raise _CutShort(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, cut_short)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _prefix() -> str:
    return f"test_claim_{uuid.uuid4().hex[:8]}"


def _what(prefix: str, postgres_base: str) -> str:
    return f"the databases {prefix}_orders, {prefix}_payments at {postgres_base}"


def _take(postgres_base: str, prefix: str, checkout: str) -> DatabaseClaim:
    claim = DatabaseClaim.take(postgres_base, prefix, [f"{prefix}_orders", f"{prefix}_payments"],
                               checkout)
    assert claim is not None, f"PostgreSQL at {postgres_base} let no one in"
    return claim


def test_a_claim_postgresql_let_go_of_in_a_restart_is_taken_again(postgres, tmp_path):
    prefix = _prefix()
    claim = _take(postgres.base, prefix, FIRST)
    run = _RunLooking(claim, tmp_path)
    try:
        run.look()
        assert run.said == []

        postgres.restart()
        run.look()

        with pytest.raises(DatabasesInUse, match=f"make run pid {os.getpid()} in {FIRST}"):
            DatabaseClaim.take(postgres.base, prefix, [], SECOND)
        assert run.said == [f"claimed {_what(prefix, postgres.base)} again: the claim's"
                            f" connection was gone (PostgreSQL restarted?)"]
        run.look()
        assert len(run.said) == 1
    finally:
        claim.release()


def test_a_claim_whose_postgresql_does_not_answer_says_so_once_and_is_taken_again_once_it_does(
        postgres, tmp_path):
    prefix = _prefix()
    claim = _take(postgres.base, prefix, FIRST)
    run = _RunLooking(claim, tmp_path)
    try:
        postgres.stop()
        run.look()
        run.look()
        run.look()

        lost = (f"lost the run's claim on {_what(prefix, postgres.base)}: PostgreSQL does not"
                f" answer (restarting?); taking it again once it does")
        assert run.said == [lost]

        postgres.start()
        run.look()

        assert run.said == [lost, f"claimed {_what(prefix, postgres.base)} again: the claim's"
                                  f" connection was gone (PostgreSQL restarted?)"]
        with pytest.raises(DatabasesInUse, match=f"make run pid {os.getpid()} in {FIRST}"):
            DatabaseClaim.take(postgres.base, prefix, [], SECOND)
    finally:
        claim.release()


def test_a_run_whose_claim_another_run_took_during_a_restart_is_stopped_naming_that_run(
        postgres, tmp_path):
    prefix = _prefix()
    claim = _take(postgres.base, prefix, FIRST)
    run = _RunLooking(claim, tmp_path)
    second = None
    try:
        postgres.restart()
        second = _take(postgres.base, prefix, SECOND)  # (in the gap, before the run's next look)

        with pytest.raises(RunMustStop) as stopped:
            run.look()

        assert str(stopped.value) == (
            f"{_what(prefix, postgres.base)} were claimed by another `make run` (make run pid"
            f" {os.getpid()} in {SECOND}) while this run's claim was gone with its connection"
            f" (PostgreSQL restarted): stopping this run, not to share them; stop the other and"
            f" start this again, or give one of them names of its own: HSESHOP_PREFIX=<name>"
            f" (README: The two commands)")
        assert run.said == []
    finally:
        claim.release()
        if second is not None:
            second.release()


def test_make_run_whose_claim_another_run_took_during_a_restart_stops_saying_whose_it_is(
        postgres, tmp_path, monkeypatch, capsys):
    """As make run runs it (devstack.__main__: its supervisor given the stack's claim), its
    stack's start cut short once the claim is taken."""
    prefix = _prefix()
    others: list[DatabaseClaim] = []

    class ClaimingOnly(make_run.Stack):
        """make run's stack, its start taking its claim on the test's PostgreSQL and no more;
        that server restarts then, and another run claims the names in the gap."""

        def start(self, timeout=60):
            self._claim_names(postgres.base)
            postgres.restart()
            others.append(_take(postgres.base, prefix, SECOND))
            return self

        def write_env_file(self, path):
            pass

    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", ClaimingOnly)
    monkeypatch.setattr(make_run, "print_urls", lambda stack, env_file: None)
    monkeypatch.setenv("HSESHOP_PREFIX", prefix)
    try:
        with _cut_short_after(30):
            assert make_run.run() == 1
    finally:
        for other in others:
            other.release()

    assert capsys.readouterr().err.splitlines() == [
        f"[devstack] the databases {prefix}_orders, {prefix}_payments, {prefix}_gateway at"
        f" {postgres.base} were claimed by another `make run` (make run pid {os.getpid()} in"
        f" {SECOND}) while this run's claim was gone with its connection (PostgreSQL"
        f" restarted): stopping this run, not to share them; stop the other and start this"
        f" again, or give one of them names of its own: HSESHOP_PREFIX=<name> (README: The two"
        f" commands)",
        "[devstack] stopped."]
