"""Peak memory of the stack's processes (bench/memory.py): a spike between two readings counts, the
last one is read as the measurement ends, and a later child given an earlier one's pid has a row
of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest

from bench import memory
from bench.memory import PeakMemory

SPIKE_MB = 200
# Touches SPIKE_MB of memory, lets it go (its RSS falls back), says so, then waits to be ended.
SPIKY = f"""
import sys
spike = bytearray({SPIKE_MB} * 2**20)
spike[::4096] = b"x" * len(spike[::4096])
del spike
print("let go", flush=True)
sys.stdin.read()
"""


class _Child:
    """A process run as the stack's are (devstack.processes.ManagedProcess's name, pid, alive)."""

    name = "spiky"

    def __init__(self):
        self._popen = subprocess.Popen([sys.executable, "-c", SPIKY], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self.pid = self._popen.pid
        assert self._popen.stdout.readline() == "let go\n"
        # (Its memory now, its spike gone: what a reading of its RSS alone finds.)
        assert psutil.Process(self.pid).memory_info().rss < SPIKE_MB / 2 * 2**20

    def alive(self) -> bool:
        return self._popen.poll() is None

    def end(self) -> None:
        self._popen.communicate(timeout=30)


@pytest.fixture
def spiky():
    child = _Child()
    yield child
    child.end()


def test_a_spike_between_two_readings_counts(spiky):
    peaks = PeakMemory(lambda: [spiky])
    peaks.sample()
    assert peaks.peaks_mb()["spiky"] >= SPIKE_MB


def test_the_peaks_are_read_once_more_as_the_measurement_ends(spiky):
    """Whatever the last reading of the thread missed (here it makes none) is read at the end."""
    with PeakMemory(lambda: [spiky], interval=3600) as peaks:
        pass
    assert peaks.peaks_mb()["spiky"] >= SPIKE_MB


def _server_whose_child_pid_was_given_again():
    """psutil.Process as it sees a server whose one child, read twice, was two processes with one
    pid: the first exited, and the system gave its pid to the next (this test's own process, so
    that its memory can be read)."""
    started = iter([1000.0, 2000.0])

    def process(pid: int):
        child_started = next(started)
        child = SimpleNamespace(pid=os.getpid(), create_time=lambda: child_started)
        return SimpleNamespace(pid=pid, children=lambda recursive: [child])

    return process


def test_a_child_given_the_pid_of_one_before_it_has_a_row_of_its_own(monkeypatch):
    monkeypatch.setattr(memory.psutil, "Process", _server_whose_child_pid_was_given_again())
    server = SimpleNamespace(name="orders-api", pid=os.getpid(), alive=lambda: True)
    peaks = PeakMemory(lambda: [server])
    peaks.sample()
    peaks.sample()
    assert set(peaks.peaks_mb()) == {"orders-api", "orders-api child 1", "orders-api child 2"}
