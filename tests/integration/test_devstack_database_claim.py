"""make run's claim on its databases kept while it runs (devstack.database_claim, looked at by
devstack.supervision), against an embedded PostgreSQL of the test's own, restarted under it.

A restart ends the claim's connection, and PostgreSQL lets go of the lock with it: nothing
noticed, and a second checkout's run then claimed the same databases while the first still ran
on them, the clobbering the claim is there to prevent.

The claim's backend frozen (SIGSTOP, as a PostgreSQL under `docker pause`) left a look at it
waiting with no limit, on the supervisor's own thread, beyond Ctrl-C's reach; its connection gone
on the run's side only (half-open: a laptop asleep, a network dropped), the backend still held
the lock, and the run took it for another run's and stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest

import devstack.__main__ as make_run

from devstack.database_claim import (
    CONNECT_TIMEOUT_SECONDS, QUERY_CUT_OFF_SECONDS, STALE_BACKEND_END_MILLISECONDS, DatabaseClaim,
    DatabasesInUse, holder_name)
from devstack.infra import free_port, start_embedded_postgres
from devstack.stack import Stack
from devstack.supervision import CLAIM_LOOK_SECONDS, RunMustStop, Supervisor
from tests.database_claim_refusals import a_stacks_databases, claimed_meanwhile_by_another_run

FIRST, SECOND = "/checkouts/first", "/checkouts/second"


# Bounds a look at a claim whose backend is frozen ends within: its query cut off, the lock
# found held by that backend, the end of which is waited for.
FROZEN_LOOK_SECONDS = (QUERY_CUT_OFF_SECONDS + CONNECT_TIMEOUT_SECONDS
                       + STALE_BACKEND_END_MILLISECONDS / 1000 + 5)
# How long a look, or the claim's release, may take with the claim's backend frozen.
PROMPT_SECONDS = 1


class _RunLooking:
    """A run holding `claim`, its supervisor looking on as make run's does, each look (look())
    once its time has come, and what it found dealt with (the claim is looked at on a thread of
    its own); what it says in `said`."""

    def __init__(self, claim: DatabaseClaim, run_dir: Path):
        self.claim = claim
        self.said: list[str] = []
        self._now = 0.0
        self.supervisor = Supervisor(Stack(run_dir), self.said.append,
                                     clock=lambda: self._now, claim=claim)

    def look(self) -> None:
        self.begin_look()
        assert self.supervisor.claim_keeper.wait_idle(FROZEN_LOOK_SECONDS)
        self.supervisor.look()

    def begin_look(self) -> None:
        """A look of the supervisor's with the claim's time come."""
        self._now += CLAIM_LOOK_SECONDS
        self.supervisor.look()


@contextmanager
def _first_run(postgres_base: str, run_dir: Path) -> Iterator[tuple[str, _RunLooking]]:
    """FIRST's run, names of its own claimed on the PostgreSQL at `postgres_base`, its supervisor
    looking on: its names' prefix and the run; its claim let go of after."""
    prefix = _prefix()
    claim = _take(postgres_base, prefix, FIRST)
    try:
        yield prefix, _RunLooking(claim, run_dir)
    finally:
        claim.release()


def _ends_within(seconds: float, do) -> bool:
    """Whether `do()`, on a thread of its own, ends within `seconds` (a blocking psycopg2 call
    cannot be interrupted otherwise)."""
    thread = threading.Thread(target=do, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def _backend_of(postgres_base: str, checkout: str) -> int:
    """The pid of the backend of the claim of `checkout`'s run (this process)."""
    with psycopg2.connect(f"{postgres_base}/postgres") as connection, \
            connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                       (holder_name(checkout),))
        (pid,), = cursor.fetchall()
    connection.close()
    return pid


@contextmanager
def _frozen(pid: int) -> Iterator[None]:
    """The process `pid` stopped (SIGSTOP) in the block, resumed after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


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


def _lost(prefix: str, postgres_base: str) -> str:
    """What a run says as its claim's PostgreSQL stops answering."""
    return (f"lost the run's claim on {_what(prefix, postgres_base)}: PostgreSQL does not answer"
            f" (restarting?); taking it again once it does")


def _claimed_again(prefix: str, postgres_base: str) -> str:
    """What a run says as it takes again a claim whose connection was gone."""
    return (f"claimed {_what(prefix, postgres_base)} again: the claim's connection was gone"
            f" (PostgreSQL restarted?)")


def _assert_the_first_run_holds(postgres_base: str, prefix: str) -> None:
    """The claim on `prefix`'s names is FIRST's run's: SECOND's is refused, naming it."""
    with pytest.raises(DatabasesInUse, match=f"make run pid {os.getpid()} in {FIRST}"):
        DatabaseClaim.take(postgres_base, prefix, [], SECOND)


def _take(postgres_base: str, prefix: str, checkout: str) -> DatabaseClaim:
    claim = DatabaseClaim.take(postgres_base, prefix, [f"{prefix}_orders", f"{prefix}_payments"],
                               checkout)
    assert claim is not None, f"PostgreSQL at {postgres_base} let no one in"
    return claim


def test_a_claim_postgresql_let_go_of_in_a_restart_is_taken_again(postgres, tmp_path):
    with _first_run(postgres.base, tmp_path) as (prefix, run):
        run.look()
        assert run.said == []

        postgres.restart()
        run.look()

        _assert_the_first_run_holds(postgres.base, prefix)
        assert run.said == [_claimed_again(prefix, postgres.base)]
        run.look()
        assert len(run.said) == 1


def test_a_claim_whose_postgresql_does_not_answer_says_so_once_and_is_taken_again_once_it_does(
        postgres, tmp_path):
    with _first_run(postgres.base, tmp_path) as (prefix, run):
        postgres.stop()
        run.look()
        run.look()
        run.look()

        assert run.said == [_lost(prefix, postgres.base)]

        postgres.start()
        run.look()

        assert run.said == [_lost(prefix, postgres.base), _claimed_again(prefix, postgres.base)]
        _assert_the_first_run_holds(postgres.base, prefix)


def test_a_run_whose_claim_another_run_took_during_a_restart_is_stopped_naming_that_run(
        postgres, tmp_path):
    with _first_run(postgres.base, tmp_path) as (prefix, run):
        postgres.restart()
        second = _take(postgres.base, prefix, SECOND)  # (in the gap, before the run's next look)
        try:
            with pytest.raises(RunMustStop) as stopped:
                run.look()

            assert str(stopped.value) == claimed_meanwhile_by_another_run(
                _what(prefix, postgres.base), SECOND)
            assert run.said == []
        finally:
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
        "[devstack] " + claimed_meanwhile_by_another_run(
            a_stacks_databases(prefix, postgres.base), SECOND),
        "[devstack] stopped."]


def test_a_look_at_a_claim_whose_backend_is_frozen_holds_up_neither_the_supervisor_nor_the_stop(
        postgres, tmp_path):
    with _first_run(postgres.base, tmp_path) as (_, run):
        with _frozen(_backend_of(postgres.base, FIRST)):
            assert _ends_within(PROMPT_SECONDS, run.begin_look), "the supervisor's look waits"
            assert _ends_within(PROMPT_SECONDS, run.supervisor.look)
            assert _ends_within(PROMPT_SECONDS, run.claim.release), "the run's stop waits"


def test_a_look_at_a_claim_whose_backend_is_frozen_ends_and_the_claim_is_taken_again_after(
        postgres, tmp_path):
    with _first_run(postgres.base, tmp_path) as (prefix, run):
        with _frozen(_backend_of(postgres.base, FIRST)):
            run.look()
            assert run.said == [_lost(prefix, postgres.base)]
        run.look()

        assert run.said[1:] == [_claimed_again(prefix, postgres.base)]
        _assert_the_first_run_holds(postgres.base, prefix)


class _HalfOpening:
    """A TCP relay to the PostgreSQL at `port`, each of whose connections can be made half-open
    (half_open): its client's end closed, its server's end left open and silent, as a network
    gone between them leaves them (the server's backend sees nothing)."""

    def __init__(self, port: int):
        self._server_port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"postgresql://postgres@127.0.0.1:{self._listener.getsockname()[1]}"
        self._clients: list[socket.socket] = []
        self._servers: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def half_open(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def close(self) -> None:
        self._listener.close()
        for end in self._clients + self._servers:
            end.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # (closed)
                return
            server = socket.create_connection(("127.0.0.1", self._server_port))
            self._clients.append(client)
            self._servers.append(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pass_on, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pass_on(source: socket.socket, sink: socket.socket) -> None:
        """Bytes from source to sink till either is gone, closing neither (the other side of a
        half-open connection stays open)."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass


def test_a_backend_of_the_claim_s_own_left_holding_it_half_open_is_not_taken_for_another_run(
        postgres, tmp_path):
    port = int(postgres.base.rsplit(":", 1)[1])
    relay = _HalfOpening(port)
    try:
        with _first_run(relay.base, tmp_path) as (prefix, run):
            stale = _backend_of(postgres.base, FIRST)
            relay.half_open()
            time.sleep(0.2)
            assert _backend_of(postgres.base, FIRST) == stale  # (the server saw nothing)

            run.look()

            assert run.said == [_claimed_again(prefix, relay.base)]
            assert _backend_of(postgres.base, FIRST) != stale
            _assert_the_first_run_holds(postgres.base, prefix)
    finally:
        relay.close()
