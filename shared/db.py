"""The database extension, and `transaction()`: the one place that commits.

Use cases and message handlers get a session from `transaction()` and never commit themselves, so a
business row and the outbox row it causes are committed together or not at all, by construction.
Work that must wait for the commit (invalidating cached reads, say) is registered with
`after_commit`. `driver_cursor` runs the busiest statements straight on the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(
    metadata=MetaData(naming_convention=NAMING_CONVENTION),
    engine_options={"pool_pre_ping": True, "pool_size": 10, "max_overflow": 10},
)

_AFTER_COMMIT = "hseshop.after_commit"
C = TypeVar("C", bound=Callable[[], None])


def after_commit(session: Session, callback: C) -> C:
    """Run `callback` once the current transaction of `session` has committed (never on rollback).

    Registering an equal callback again in one transaction runs it once: the one registered first
    is returned, so a caller can add to what it will do.
    """
    callbacks = session.info.setdefault(_AFTER_COMMIT, [])
    for registered in callbacks:
        if registered == callback:
            return registered
    callbacks.append(callback)
    return callback


@contextmanager
def transaction() -> Iterator[Session]:
    """One database transaction: commit when the block ends, roll back if it raises."""
    session = db.session()
    if session.in_transaction():
        # Reads made earlier in the request (or task) are not part of this unit of work.
        session.rollback()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        session.info.pop(_AFTER_COMMIT, None)
        raise
    for callback in session.info.pop(_AFTER_COMMIT, []):
        callback()


@contextmanager
def driver_cursor(session: Session) -> Iterator:
    """A psycopg2 cursor on the connection of the session's transaction, closed when the block ends.

    For the statements the shop runs for every order, many times a second (the inbox and outbox
    machinery, the handlers', placing an order): SQLAlchemy's statement and result handling
    costs several times what the driver's does, and a plain SQL string with its parameters is no
    harder to read. Rows come back as tuples, uuid columns as strings unless cast in the query.
    """
    cursor = session.connection().connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def driver_dsn(database_url: str) -> str:
    """The psycopg2 connection string for a service's SQLAlchemy database URL, for the few
    connections the shop holds outside the pool (the relay's LISTEN, the inbox consumer's)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
