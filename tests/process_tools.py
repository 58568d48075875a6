"""Process tools for the tests."""

from __future__ import annotations


def gone(pid: int) -> bool:
    """True once pid no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
