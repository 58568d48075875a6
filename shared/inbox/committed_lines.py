"""Lines that say what a transaction did to inbox messages (handled one, parked one), said once it
has committed, each with its message's request id.

Said as the work was done, such a line stood for work that a rollback undid: a batch handled at
once that rolled back whole for another message's failure (and said it all again, handled one by
one), a COMMIT that failed. Nor is one said for a COMMIT whose answer was lost, though it may have
committed (shared.db.after_commit): a line must not claim what may not have happened."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from shared.db import collected_after_commit
from shared.request_context import request_id_bound


def say_once_committed(session: Session, logger: logging.Logger, level: int,
                       request_id: str | None, text: str, *args: object) -> None:
    """Have `logger` say `text % args` at `level`, `request_id` bound, once the session's
    transaction has committed; never if it does not."""
    collected_after_commit(session, _LinesOnceCommitted, _LinesOnceCommitted).lines.append(
        (logger, level, request_id, text, args))


class _LinesOnceCommitted:
    """The lines a transaction is to say once committed, in the order they were asked for (one
    per transaction: shared.db.collected_after_commit)."""

    def __init__(self):
        self.lines: list[tuple[logging.Logger, int, str | None, str, tuple[object, ...]]] = []

    def __call__(self) -> None:
        for logger, level, request_id, text, args in self.lines:
            with request_id_bound(request_id):
                logger.log(level, text, *args)
