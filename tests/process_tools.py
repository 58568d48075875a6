"""Process tools for the tests."""

from __future__ import annotations

import subprocess

from devstack.leftovers import started_at


def gone(pid: int) -> bool:
    """True once pid no longer runs (a zombie waiting for its reaper counts as gone)."""
    return started_at(pid) is None


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Ask a process to stop (SIGTERM), and kill it if it has not within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
