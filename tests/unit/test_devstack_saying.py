"""What the stack says on stderr, and how it reads its switches (devstack)."""

from __future__ import annotations

import errno
import io

import pytest

from devstack import infra
from devstack.infra import free_port
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import Stack
from shared.config import SERVICES


class _Gone(io.StringIO):
    """A stderr no one reads any more: a pipe whose reader went, or a terminal closed."""

    def __init__(self, error: OSError):
        super().__init__()
        self._error = error

    def write(self, text: str) -> int:
        raise self._error


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                   OSError(errno.EIO, "Input/output error")])
def test_a_line_the_stack_cannot_say_is_dropped_not_raised(tmp_path, monkeypatch, error):
    """Said by the drain as the stack stops (`make run 2>&1 | tee log`, tee stopped by the same
    Ctrl-C), its error stopped the stack at once, the messages in flight lost with the broker."""
    monkeypatch.setattr("sys.stderr", _Gone(error))
    Stack(tmp_path, quiet=False)._say("waiting for the orders in flight to settle")


@pytest.mark.parametrize("said, forced", [("", False), ("0", False), ("false", False),
                                          ("False", False), ("NO", False), (" no ", False),
                                          ("1", True), ("yes", True), ("TRUE", True)])
def test_forcing_embedded_servers_reads_its_switch_whatever_its_case(monkeypatch, said, forced):
    monkeypatch.setenv(infra.FORCE_EMBEDDED_VAR, said)
    assert infra.force_embedded() is forced


def test_a_quiet_stack_says_it_is_stopping_as_ctrl_c_comes(tmp_path, capsys):
    """The benchmark's stack is quiet: on Ctrl-C it said nothing while it stopped, for seconds."""
    Stack(tmp_path, quiet=True)._say_stopping()
    assert capsys.readouterr().err == "\n[devstack] stopping...\n"


def test_a_stack_whose_data_is_thrown_away_stops_without_waiting_for_orders_in_flight(
        tmp_path, capsys):
    """The benchmark's: its databases are dropped once it stops, so no order in flight is worth
    the drain's wait (up to 15 s after Ctrl-C). Its processes here are sleeps under the shop's
    names, its databases nowhere (what a drain wrongly run would look at)."""
    shop = Stack(tmp_path, quiet=False, data_thrown_away=True)
    shop._group = ProcessGroup(handle_signals=False)
    shop._env = {f"{service.upper()}_DATABASE_URL": f"postgresql://postgres@127.0.0.1:"
                 f"{free_port()}/{service}" for service in SERVICES}
    for name in ("broker", "orders-worker", "orders-grpc"):
        process = shop._group.start(ManagedProcess(name, ["sleep", "60"], None,
                                                   tmp_path / f"{name}.log"))
        if name == "broker":
            shop._broker = process
    shop._arrange_the_drain()

    shop.stop()

    assert "in flight" not in capsys.readouterr().err
    assert not any(process.alive() for process in shop.processes)
