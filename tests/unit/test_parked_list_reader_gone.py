"""tasks/parked.py's `list` whose reader goes before it is done (`| head`): an end, not a
traceback. The listing is stood in for by lines enough to fill a pipe; the listing itself goes
against PostgreSQL in tests/integration/test_inbox_tasks.py and test_outbox.py."""

from __future__ import annotations

import fcntl
import os
import subprocess
import struct
import sys
import termios
import time
from pathlib import Path

from tasks import parked
from tests.process_tools import end_child, start_child

REPO = Path(__file__).resolve().parents[2]


def test_list_whose_reader_goes_ends_as_a_command_ended_by_sigpipe(monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader, gone
    with capsys.disabled(), os.fdopen(write_end, "w") as piped:
        monkeypatch.setattr("sys.stdout", piped)
        monkeypatch.setattr(parked, "list_parked", lambda *args: [
            print("a parked message " * 20) for _ in range(10_000)])
        assert parked.main(["list", "orders", "--limit", "10000"]) == parked.SIGPIPE_EXIT


# A stand-in listing for the command run in its own process: LINES lines of LINE_LENGTH bytes.
_LISTING_STOOD_IN = """
import sys
from tasks import parked
parked.list_parked = lambda *args: [print(f"{{n:07d}} " + "a parked message " * 5)
                                    for n in range({lines})]
sys.exit(parked.main(["list", "orders", "--limit", "10000"]))
"""
LINE_LENGTH = len("0000000 " + "a parked message " * 5 + "\n")


def test_list_whose_reader_goes_while_its_last_lines_wait_in_its_buffer_ends_as_by_sigpipe():
    """The command as an operator runs it, its output a pipe (so block-buffered: no
    PYTHONUNBUFFERED) to a reader that reads one line and closes, as `| head -1` does: a listing
    that fills the pipe, and the buffer's last few kilobytes written only as it ends. Those went
    out at the interpreter's exit, after `list`'s own handling, which the reader's going escaped:
    'Exception ignored ... BrokenPipeError' and exit 120. Each time, 141 and nothing said."""
    pipe_holds = 65536  # (Linux's default; set below, in case a system's differs)
    lines = (pipe_holds + 4000) // LINE_LENGTH
    environment = {name: value for name, value in os.environ.items()
                   if name != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(REPO)}
    for _ in range(3):
        command = start_child(
            [sys.executable, "-c", _LISTING_STOOD_IN.format(lines=lines)], cwd=REPO,
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            fcntl.fcntl(command.stdout.fileno(), fcntl.F_SETPIPE_SZ, pipe_holds)
            _wait_until_full(command.stdout.fileno(), pipe_holds)  # its last lines wait then
            first = os.read(command.stdout.fileno(), LINE_LENGTH)
            command.stdout.close()  # the reader, gone after one line
            said = command.stderr.read()
            assert (command.wait(timeout=30), said, first[:8]) == (parked.SIGPIPE_EXIT, b"",
                                                                    b"0000000 ")
        finally:
            end_child(command)


def _wait_until_full(read_end: int, holds: int, within: float = 30.0) -> None:
    """Wait until what waits in the pipe comes within a write buffer (8 KiB) of what it `holds`
    and grows no more: the command wrote all it will before its end."""
    deadline, waiting, still_since = time.monotonic() + within, -1, time.monotonic()
    while True:
        now_waiting = struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0]
        if now_waiting != waiting:
            waiting, still_since = now_waiting, time.monotonic()
        elif waiting > holds - 8192 and time.monotonic() - still_since > 0.2:
            return
        assert time.monotonic() < deadline, f"the listing filled the pipe with {waiting} bytes"
        time.sleep(0.01)
