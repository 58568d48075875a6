"""devstack.postmaster_lock's reading of a lock file and of the System V segments it names (the
whole of it, with real servers: tests/integration/test_devstack_infra.py)."""

from __future__ import annotations

from devstack import postmaster_lock
from devstack.postmaster_lock import LOCK_FILE, PostmasterLock, processes_attached_to

_PROC_HEADER = ("       key      shmid perms                  size  cpid  lpid nattch   uid   gid"
                "  cuid  cgid      atime      dtime      ctime                   rss"
                "                  swap\n")


def test_a_segment_whose_key_is_past_2_to_the_31_is_found_though_the_two_write_it_apart(
        tmp_path, monkeypatch):
    """A server's key is its data directory's inode number as a 32-bit key_t: past 2**31 (a large
    file system's inodes), postmaster.pid writes it as an unsigned long (2**64 less), /proc as a
    negative int. Read apart, its segment was never found, and taken for gone while in use."""
    (tmp_path / LOCK_FILE).write_text(
        f"4242\n{tmp_path}\n1796511385\n60361\n\n127.0.0.1\n"
        f"{2**64 - 5:9d} {98315:9d}\nready   \n")
    segments = tmp_path / "shm"
    segments.write_text(
        _PROC_HEADER
        + "   1433715          4   600      56  2264 12397      5   101   104   101   104"
          " 1796511383 1796511383 1796511087  4096  0\n"
        + "        -5      98315   600      56  4242  4300      3  1001  1001  1001  1001"
          " 1796511385 1796511385 1796511385  4096  0\n")
    monkeypatch.setattr(postmaster_lock, "SYSV_SHARED_MEMORY", segments)

    lock = PostmasterLock.read(tmp_path)

    assert (lock.pid, lock.port) == (4242, 60361)
    assert processes_attached_to(lock.shared_memory) == 3
    assert processes_attached_to((2**32 - 5, 98316)) == 0  # (another id: gone)
