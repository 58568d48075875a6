"""Every parked message changed a batch a transaction, for an operator's command under --all
(tasks.parked): the inbox's parked messages and the outbox's parked rows, each box reading its own
in batches in its own order (shared.inbox.parked, shared.outbox.parked)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from sqlalchemy.orm import Session

from shared.db import rolled_back_transaction, transaction


class ParkedPlace(Protocol):
    """A parked message's place in the order its box reads them in batches."""

    @property
    def message_id(self) -> uuid.UUID: ...


_Place = TypeVar("_Place", bound=ParkedPlace)
_Changed = TypeVar("_Changed")


@dataclass(frozen=True)
class Bound(Generic[_Place]):
    """Where a run over every parked message stops: the place of the one parked last as the
    bound was read (None while none was)."""
    place: _Place | None


def bound_now(last_parked: Callable[[Session], _Place | None]) -> Bound[_Place]:
    """The bound of a run over every parked message that begins now: the place of the one
    `last_parked` reads, in a transaction of its own."""
    with transaction() as session:
        return Bound(last_parked(session))


def all_parked_changed_in_transactions(
        last_parked: Callable[[Session], _Place | None],
        parked_batch: Callable[[Session, _Place, _Place | None, int], list[_Place]],
        change: Callable[[Session, list[uuid.UUID]], list[_Changed]], size: int,
        may_come_back: bool, dry_run: bool = False,
        through: Bound[_Place] | None = None) -> Iterator[list[_Changed]]:
    """Run `change` on every message parked up to the place of the one `last_parked` as it begins
    (or up to `through`, a bound read before: a discard the operator confirmed takes the messages
    its dry run counted under it, not those parked while the operator was asked), `size` at a
    time in the order `parked_batch` reads them (the first `size` after a place, from the first
    when None, and up to that bound); yields what `change` returned in each transaction
    (the messages it changed), as it commits. Each transaction short (a few million parked in one
    statement ran past SESSION_LIMITS' statement_timeout and changed nothing), and one that fails
    leaves those before it done; nothing is kept of a batch once it has committed, but, when a
    changed message `may_come_back` parked again (a replay), the ids taken, so that none is taken
    twice (one parked again may sort anywhere up to the bound). A message parked once it has begun
    past the bound is left alone: a replayed message parked again at once is not taken up again
    and again."""
    last = (bound_now(last_parked) if through is None else through).place
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
