"""Parked messages changed a batch a transaction, for an operator's command (tasks.parked): under
--all, the inbox's parked messages and the outbox's parked rows, each box reading its own in
batches in its own order (shared.inbox.parked, shared.outbox.parked); or the very messages a count
found, batch by batch as it found them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from shared.db import rolled_back_transaction, transaction


class ParkedPlace(Protocol):
    """A parked message's place in the order its box reads them in batches."""

    @property
    def message_id(self) -> uuid.UUID: ...


_Place = TypeVar("_Place", bound=ParkedPlace)
_Changed = TypeVar("_Changed")

# The bytes of a message id as CountedMessages keeps it (UUID.bytes).
_ID_BYTES = 16


class CountedMessages:
    """The ids of the messages a count found (a dry run's, each of its transactions' ids added as
    it ends), kept batch by batch, each batch's packed in one bytes object: 16 bytes a message
    (a Python int takes some 53, a UUID object some 109), so that a count of millions parked is
    kept in a small operator's container (3 million in some 46 MiB)."""

    def __init__(self) -> None:
        self._batches: list[bytes] = []
        self.count = 0

    def add(self, message_ids: list[uuid.UUID]) -> None:
        """Keep the ids of one batch counted (none kept of an empty one)."""
        if message_ids:
            self._batches.append(b"".join(message_id.bytes for message_id in message_ids))
            self.count += len(message_ids)

    def batches(self) -> Iterator[list[uuid.UUID]]:
        """The ids counted, a list of them a batch, as they were added."""
        for packed in self._batches:
            yield [uuid.UUID(bytes=packed[start:start + _ID_BYTES])
                   for start in range(0, len(packed), _ID_BYTES)]

    def __iter__(self) -> Iterator[uuid.UUID]:
        for batch in self.batches():
            yield from batch


def changed_in_transactions(batches: Iterable[list[uuid.UUID]],
                            change: Callable[[Session, list[uuid.UUID]], list[_Changed]],
                            dry_run: bool = False) -> Iterator[list[_Changed]]:
    """Run `change` on each batch of messages named in a transaction of its own (rolled back under
    `dry_run`); yields what it returned in each (the messages it changed), as it commits."""
    for message_ids in batches:
        with (rolled_back_transaction if dry_run else transaction)() as session:
            changed = change(session, message_ids)
        yield changed


def all_parked_changed_in_transactions(
        last_parked: Callable[[Session], _Place | None],
        parked_batch: Callable[[Session, _Place, _Place | None, int], list[_Place]],
        change: Callable[[Session, list[uuid.UUID]], list[_Changed]], size: int,
        may_come_back: bool, dry_run: bool = False) -> Iterator[list[_Changed]]:
    """Run `change` on every message parked up to the place of the one `last_parked` as it
    begins, `size` at a time in the order `parked_batch` reads them (the first `size` after a
    place, from the first when None, and up to that bound); yields what `change` returned in each
    transaction (the messages it changed), as it commits. Each transaction short (a few million
    parked in one statement ran past SESSION_LIMITS' statement_timeout and changed nothing), and
    one that fails leaves those before it done; nothing is kept of a batch once it has committed,
    but, when a changed message `may_come_back` parked again (a replay), the ids taken, so that
    none is taken twice (one parked again may sort anywhere up to the bound). A message parked
    once it has begun past the bound is left alone: a replayed message parked again at once is
    not taken up again and again."""
    with transaction() as session:
        last = last_parked(session)
    after = None
    # As ints, not UUID objects: about 90 bytes a message, for any number parked.
    taken: set[int] = set()
    while last is not None:
        with (rolled_back_transaction if dry_run else transaction)() as session:
            batch = parked_batch(session, last, after, size)
            ids = [place.message_id for place in batch if place.message_id.int not in taken]
            changed = change(session, ids)
        if may_come_back:
            taken.update(message_id.int for message_id in ids)
        yield changed
        if len(batch) < size:
            return
        after = batch[-1]
