"""Peak resident memory of every process of the stack, sampled with psutil during the benchmark."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil

from devstack.processes import ManagedProcess


class PeakMemory:
    """Samples the RSS of each process and its children (gunicorn workers, say) in a thread."""

    def __init__(self, processes: Callable[[], list[ManagedProcess]], interval: float = 0.5):
        self._processes = processes
        self._interval = interval
        self._peaks: dict[str, int] = {}
        self._child_names: dict[int, str] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._thread.join()

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
                leader = psutil.Process(process.pid)
                self._note(process.name, leader)
                for child in leader.children(recursive=True):
                    self._note(self._child_name(process.name, child.pid), child)
            except psutil.Error:
                continue  # it exited between the check and the read

    def _child_name(self, parent: str, pid: int) -> str:
        if pid not in self._child_names:
            siblings = sum(name.startswith(f"{parent} child")
                           for name in self._child_names.values())
            self._child_names[pid] = f"{parent} child {siblings + 1}"
        return self._child_names[pid]

    def _note(self, name: str, process: psutil.Process) -> None:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            return
        self._peaks[name] = max(self._peaks.get(name, 0), rss)
