"""Peak resident memory of every process of the stack: the kernel's high-water mark of each
(VmHWM), read during the benchmark, its processes' children found with psutil."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from devstack.processes import ManagedProcess


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The peak resident memory of process `pid` over its life so far, however brief the spike:
    the kernel's high-water mark (VmHWM in /proc/<pid>/status). None once it has exited (a
    zombie's status has no memory left to tell of). (Not getrusage's ru_maxrss: across the fork
    and exec that started a process, that keeps its parent's, when larger.)"""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass  # it exited
    return None


class PeakMemory:
    """Reads the peak memory of each process and its children (gunicorn workers, say) in a thread,
    and once more as it ends: each reading is the high-water mark of a process's whole life, so
    the spikes between readings count, and only a process that exits between two readings has
    its last ones unread."""

    def __init__(self, processes: Callable[[], list[ManagedProcess]], interval: float = 0.5):
        self._processes = processes
        self._interval = interval
        self._peaks: dict[str, int] = {}
        # (parent's name, pid, start time) -> the child's name: a pid the system gave again to
        # a later child is another child, with a row of its own.
        self._child_names: dict[tuple[str, int, float], str] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._thread.join()
        self.sample()

    def peaks_mb(self) -> dict[str, float]:
        return {name: round(rss / 2**20, 1) for name, rss in sorted(self._peaks.items())}

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        for process in self._processes():
            if not process.alive():
                continue
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.Error:
                continue  # it exited between the check and the read
            self._note(process.name, process.pid)
            for child in children:
                try:
                    name = self._child_name(process.name, child.pid, child.create_time())
                except psutil.Error:
                    continue  # it exited since
                self._note(name, child.pid)

    def _child_name(self, parent: str, pid: int, started: float) -> str:
        key = (parent, pid, started)
        if key not in self._child_names:
            siblings = sum(known_parent == parent for known_parent, _, _ in self._child_names)
            self._child_names[key] = f"{parent} child {siblings + 1}"
        return self._child_names[key]

    def _note(self, name: str, pid: int) -> None:
        peak = peak_rss_bytes(pid)
        if peak is not None:
            self._peaks[name] = max(self._peaks.get(name, 0), peak)
