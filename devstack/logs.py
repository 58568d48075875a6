"""Follow log files to the terminal like `tail -F`, each line prefixed with its process name; keep
the run before's log of each process."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO


def keep_the_previous_log(path: str | os.PathLike) -> None:
    """Keep the log a run before wrote at `path` as `path`.1 (in place of the one before it: two
    runs' logs on disk, no more), for this run to write `path` afresh. Truncated, a run that died
    lost its logs to the next one, which the developer starts to see why."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, f"{os.fspath(path)}.1")


class LogFollower:
    """Polls a set of named log files and writes their new complete lines, prefixed, to out."""

    def __init__(self, files: Iterable[tuple[str, Path]], out: TextIO | None = None):
        self._files = [(name, Path(path)) for name, path in files]
        self._out = out if out is not None else sys.stdout
        self._width = max((len(name) for name, _ in self._files), default=0)
        self._offsets = {path: 0 for _, path in self._files}
        self._partial = {path: b"" for _, path in self._files}

    def poll(self) -> int:
        """Print what was appended since the last call; returns the number of lines printed."""
        printed = 0
        for name, path in self._files:
            for line in self._new_lines(path):
                self._out.write(f"{name:>{self._width}} | {line}\n")
                printed += 1
        self._out.flush()
        return printed

    def _new_lines(self, path: Path) -> list[str]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offsets[path]:  # truncated, e.g. a restarted process: start over
            self._offsets[path] = 0
            self._partial[path] = b""
        if size == self._offsets[path]:
            return []
        with open(path, "rb") as log:
            log.seek(self._offsets[path])
            data = self._partial[path] + log.read()
            self._offsets[path] = log.tell()
        *complete, self._partial[path] = data.split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in complete]
