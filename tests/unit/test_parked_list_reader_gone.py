"""tasks/parked.py's `list` whose reader goes before it is done (`| head`): an end, not a
traceback. The listing is stood in for by lines enough to fill a pipe; the listing itself goes
against PostgreSQL in tests/integration/test_inbox_tasks.py and test_outbox.py."""

from __future__ import annotations

import os

from tasks import parked


def test_list_whose_reader_goes_ends_as_a_command_ended_by_sigpipe(monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader, gone
    with capsys.disabled(), os.fdopen(write_end, "w") as piped:
        monkeypatch.setattr("sys.stdout", piped)
        monkeypatch.setattr(parked, "list_parked", lambda *args: [
            print("a parked message " * 20) for _ in range(10_000)])
        assert parked.main(["list", "orders", "--limit", "10000"]) == parked.SIGPIPE_EXIT
