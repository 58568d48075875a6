"""tasks/parked.py: what `replay --all` and `discard --all` (inbox messages or outbox rows) keep in
memory a message, so that any number parked goes through in a small operator's container (3
million once took some 700 MiB).
The database is stood in for by fresh UUIDs, as psycopg2 returns them; the batches themselves go
against PostgreSQL in tests/integration/test_inbox_tasks.py (and test_outbox.py)."""

from __future__ import annotations

import contextlib
import io
import sys
import tracemalloc
import uuid
from collections import namedtuple
from datetime import datetime, timezone

import pytest

from shared import parked_batches
from shared.inbox.parked import ParkedPlace
from shared.outbox.parked import ParkedRowPlace
from tasks import parked

PARKED = 60_000

# A row discard_parked_messages (or discard_parked_outbox_messages) returns for a message it
# discarded.
Discarded = namedtuple("Discarded", "message_id type order_id")


class _TerminalAnsweringYes(io.StringIO):
    """stdin as a terminal the operator answers y on."""

    def __init__(self) -> None:
        super().__init__("y\n")

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("command", "outbox", "confirmed", "most_bytes_a_message"),
                         [("replay", False, False, 120), ("discard", False, False, 20),
                          ("replay", True, False, 20), ("discard", True, False, 20),
                          ("discard", False, True, 30), ("discard", True, True, 30)])
def test_all_parked_keeps_little_a_message(monkeypatch, capsys, command, outbox, confirmed,
                                           most_bytes_a_message):
    """Measured as the last batch is changed: what the run still holds of all before it. An
    inbox replay keeps each id taken as an int (a message parked again may come back, its place
    new), a discard none (a discarded message is never parked again), nor an outbox replay (a row
    parked again keeps its place, its id, behind the batches to come); none keeps a list of what
    it changed. A discard `confirmed` on a terminal keeps the ids its count found, from its count's
    first batch to its own last, 16 bytes each (shared.parked_batches.CountedMessages), and holds
    a batch of them as UUIDs while its transaction goes (some 8 bytes a message of these 60,000):
    kept as Python ints they took some 53 bytes a message, as UUIDs some 109."""
    texts = [str(uuid.uuid4()) for _ in range(PARKED)]
    places = {text: position for position, text in enumerate(texts)}
    now = datetime.now(timezone.utc)

    def place(position: int):  # (the inbox's by park, the outbox's by row id)
        message_id = uuid.UUID(texts[position])
        return ParkedRowPlace(position + 1, message_id) if outbox else ParkedPlace(now, message_id)

    def parked_batch(session, through, after, size):
        start = 0 if after is None else places[str(after.message_id)] + 1
        return [place(position) for position in range(start, min(start + size, PARKED))]

    held = []

    def changed(session, message_ids, marked_at=None):  # (RETURNING's UUIDs, not the batch's)
        held.append(tracemalloc.get_traced_memory()[0])
        return [uuid.UUID(str(message_id)) for message_id in message_ids]

    def discarded(session, message_ids):  # (rows, none of them a payment event's)
        return [Discarded(message_id, None, None) for message_id in changed(session, message_ids)]

    monkeypatch.setattr(parked, "service_app",
                        lambda service: type("App", (), {"app_context": contextlib.nullcontext}))
    monkeypatch.setattr(parked, "_in_the_services_database",
                        lambda service: contextlib.nullcontext())
    monkeypatch.setattr(parked_batches, "transaction", contextlib.nullcontext)
    monkeypatch.setattr(parked_batches, "rolled_back_transaction", contextlib.nullcontext)
    if confirmed:  # (asked on a terminal, answered y; then whether any is parked still)
        monkeypatch.setattr(sys, "stdin", _TerminalAnsweringYes())
        monkeypatch.setattr(parked, "_the_terminal", lambda: contextlib.nullcontext(io.StringIO()))
        monkeypatch.setattr(parked, "transaction", contextlib.nullcontext)
    # (No session to note on what a COMMIT gone unanswered audits: none is.)
    monkeypatch.setattr(parked, "if_commit_unanswered", lambda session, callback: None)
    monkeypatch.setattr(parked, "database_now", lambda session: now)  # (the replay's mark)
    monkeypatch.setattr(parked, "last_parked_outbox_row" if outbox else "last_parked",
                        lambda session: place(PARKED - 1))
    monkeypatch.setattr(parked, "parked_outbox_batch" if outbox else "parked_batch", parked_batch)
    monkeypatch.setattr(parked, "unpark_outbox_messages" if outbox else "unpark_messages",
                        changed)
    monkeypatch.setattr(parked, "discard_parked_outbox_messages" if outbox
                        else "discard_parked_messages", discarded)
    monkeypatch.setattr(parked, "_dispatched", lambda service, message_ids, marked_at: True)
    # (Its audit lines name the database, and are not kept, as pytest's log capture keeps them.)
    monkeypatch.setattr(parked, "_database", lambda service: "hseshop_payments at db:5432")
    monkeypatch.setattr(parked._audit_log, "disabled", True)
    tracemalloc.start()
    try:
        assert parked.main([command, "payments", "--all", *(["--outbox"] if outbox else [])]) == 0
    finally:
        tracemalloc.stop()
    assert f"{PARKED} message(s)" in capsys.readouterr().out
    assert len(held) > 1  # (a batch a transaction)
    assert (held[-1] - held[0]) / PARKED < most_bytes_a_message, (held[-1] - held[0]) / PARKED
