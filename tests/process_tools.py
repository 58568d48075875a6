"""Process tools for the tests."""

from __future__ import annotations

from devstack.leftovers import started_at


def gone(pid: int) -> bool:
    """True once pid no longer runs (a zombie waiting for its reaper counts as gone)."""
    return started_at(pid) is None
