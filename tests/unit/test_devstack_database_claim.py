"""The name a run's claim on its databases shows the run that meets it, and what a look at the
claim makes of the lock's holder, on a scripted server's answers (devstack.database_claim;
test_devstack_database_claim under integration has it against a PostgreSQL)."""

from __future__ import annotations

import os
import threading
import time

import psycopg2
import pytest

from devstack import database_claim
from devstack.database_claim import (
    APPLICATION_NAME_BYTES,
    DatabaseClaim,
    DatabasesInUse,
    Kept,
    holder_name,
)


def test_the_claims_holder_is_named_by_its_pid_and_checkout():
    assert holder_name("/home/me/hseshop") == f"make run pid {os.getpid()} in /home/me/hseshop"


def test_a_checkout_too_long_for_postgresql_to_keep_is_named_by_its_end():
    """PostgreSQL keeps 63 bytes of an application_name: a deep checkout's path lost its end,
    the part that tells two checkouts apart."""
    checkout = "/home/me/" + "projects/" * 10 + "hseshop-second"

    name = holder_name(checkout)

    assert len(name.encode()) <= APPLICATION_NAME_BYTES
    assert name.startswith(f"make run pid {os.getpid()} in ...")
    assert name.endswith("/hseshop-second")


class _ScriptedServer:
    """A PostgreSQL's answers to a claim's queries, in order: each try of the lock (taken or
    not), each look for the lock's holder (its row, or None: the server shows none)."""

    def __init__(self, tries: list[bool], holders: list[tuple | None]):
        self.tries, self.holders = tries, holders
        self.connections: list[_ScriptedConnection] = []

    def connect(self, *args, **kwargs) -> _ScriptedConnection:
        self.connections.append(connection := _ScriptedConnection(self))
        return connection


class _ScriptedConnection:
    autocommit = False

    def __init__(self, server: _ScriptedServer):
        self.server, self.closed = server, False

    def cursor(self) -> _ScriptedCursor:
        return _ScriptedCursor(self.server)

    def close(self) -> None:
        self.closed = True


class _ScriptedCursor:
    def __init__(self, server: _ScriptedServer):
        self.server, self.row = server, None

    def __enter__(self) -> _ScriptedCursor:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def execute(self, query: str, parameters=None) -> None:
        if "pg_try_advisory_lock" in query:
            self.row = (self.server.tries.pop(0),)
        elif "FROM pg_locks" in query:
            self.row = self.server.holders.pop(0)
        elif "pg_backend_pid()" in query:
            self.row = (4242, "its backend_start")
        else:
            raise AssertionError(f"not scripted: {query}")

    def fetchone(self):
        return self.row


def _claim_on(server: _ScriptedServer, monkeypatch) -> DatabaseClaim:
    monkeypatch.setattr(psycopg2, "connect", server.connect)
    return DatabaseClaim("postgresql://postgres@127.0.0.1:5432", "hseshop", ["hseshop_orders"],
                         "/home/me/hseshop")


def test_a_holder_ending_as_it_is_looked_for_is_no_other_run_s_and_the_lock_is_tried_again(
        monkeypatch):
    """The claim's connection gone half-open (a network dropped), its old backend ends just as
    the claim is taken again (the server's keepalives give up about when the client's do): the
    lock refused, its holder then shown by no one. The run stopped, "claimed by another make run
    (one that has just ended)", naming no run; the lock is tried again and taken."""
    server = _ScriptedServer(tries=[False, True], holders=[None])

    assert _claim_on(server, monkeypatch).keep() is Kept.TAKEN_AGAIN
    assert server.tries == [] and not server.connections[0].closed


def test_a_holder_unseen_twice_over_is_out_of_reach_and_looked_for_again_not_another_run(
        monkeypatch):
    server = _ScriptedServer(tries=[False, False], holders=[None, None])

    assert _claim_on(server, monkeypatch).keep() is Kept.OUT_OF_REACH
    assert server.connections[0].closed


def test_a_holder_seen_as_the_lock_is_tried_again_is_the_run_named(monkeypatch):
    server = _ScriptedServer(
        tries=[False, False],
        holders=[None, (77, "its backend_start", "make run pid 77 in /home/me/hseshop-b")])

    with pytest.raises(DatabasesInUse, match=r"\(make run pid 77 in /home/me/hseshop-b\)"):
        _claim_on(server, monkeypatch).keep()


def test_a_run_starting_where_the_lock_s_holder_is_unseen_twice_over_is_told_to_try_again(
        monkeypatch):
    server = _ScriptedServer(tries=[False, False], holders=[None, None])
    monkeypatch.setattr(psycopg2, "connect", server.connect)

    with pytest.raises(DatabasesInUse, match="ending as it was looked for: try again"):
        DatabaseClaim.take("postgresql://postgres@127.0.0.1:5432", "hseshop",
                           ["hseshop_orders"], "/home/me/hseshop")


def test_a_block_whose_cut_has_begun_ends_only_once_the_cut_is_over(monkeypatch):
    """The cut-off's timer fired as the block's queries ended: the block returned while the cut
    still ran, free to shut the connection the claim had just kept as its own. It ends once the
    cut is over, failing as a block cut off does (its connection is shut: none to keep)."""
    cut_begun, cut_over = threading.Event(), threading.Event()

    def slow_cut(connection) -> None:
        cut_begun.set()
        time.sleep(0.5)
        cut_over.set()

    monkeypatch.setattr(database_claim, "_cut", slow_cut)
    with pytest.raises(psycopg2.OperationalError, match="cut off after 0.01 s"):
        with database_claim._cut_off_after(object(), seconds=0.01):
            assert cut_begun.wait(2)
    assert cut_over.is_set()


def test_a_block_over_before_its_cut_off_ends_at_once_and_is_not_cut(monkeypatch):
    cut = threading.Event()
    monkeypatch.setattr(database_claim, "_cut", lambda connection: cut.set())

    began = time.monotonic()
    with database_claim._cut_off_after(object(), seconds=0.5):
        pass
    assert time.monotonic() - began < 0.4
    assert not cut.wait(0.7)
