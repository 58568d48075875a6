"""The chaos soak's kill (bench/chaos/disruptions.py: kill_with_its_children) touches a process
only while its pid is still its own: one never started, or one that died of itself and was
reaped (its pid free for another's), is left alone, where the first froze the caller (psutil's
Process(None)) and the second could freeze another process and kill its children."""

from __future__ import annotations

import sys

import psutil

from bench.chaos.disruptions import kill_with_its_children
from devstack.processes import ManagedProcess
from tests.polling import wait_for


def _process(tmp_path, *code: str) -> ManagedProcess:
    return ManagedProcess("sleeper", [sys.executable, "-c", ";".join(code)], None,
                          tmp_path / "sleeper.log")


def _touches(process: ManagedProcess, monkeypatch) -> list:
    """The pids kill_with_its_children looks up or signals for `process` (none signalled)."""
    touched: list = []
    monkeypatch.setattr(psutil, "Process", lambda pid=None: touched.append(pid))
    monkeypatch.setattr(process, "kill", lambda: touched.append(process.pid))
    kill_with_its_children(process)
    return touched


def test_a_process_never_started_is_left_alone(tmp_path, monkeypatch):
    """(psutil.Process(None) is the caller's own process: frozen, it would never wake.)"""
    assert _touches(_process(tmp_path, "pass"), monkeypatch) == []


def test_a_process_that_died_of_itself_is_not_signalled_again(tmp_path, monkeypatch):
    process = _process(tmp_path, "pass").start()
    try:
        wait_for(lambda: not process.alive(), timeout=10, what="the process to exit of itself")
        assert _touches(process, monkeypatch) == []  # (its pid, reaped, may be another's by now)
    finally:
        monkeypatch.undo()
        process.stop()  # (reaped: its Popen otherwise warns, ResourceWarning, as it is collected)


def test_a_live_process_is_killed_with_its_children(tmp_path):
    process = _process(tmp_path, "import subprocess, sys, time",
                       "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid();"
                       " time.sleep(60)'])", "time.sleep(60)").start()
    try:
        leader = psutil.Process(process.pid)
        wait_for(lambda: leader.children(), timeout=10, what="the sleeper's child")
        child = leader.children()[0]
        kill_with_its_children(process)
        assert not process.alive()
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        process.stop()
