"""What the stack says on stderr, and how it reads its switches (devstack)."""

from __future__ import annotations

import errno
import io

import pytest

from devstack import infra
from devstack.stack import Stack


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
