"""A connection lost is noted on the SQLAlchemy connection where its error is met, whoever catches
it (shared.db.connection_lost_on: the inbox handling reads it after a handler), for as long as it
is lost: not for an error of a sound connection, and not once the connection is on a new one."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.db import connection_lost_on, db, driver_cursor
from tests.postgres_tools import (ending_its_session_by_a_driver_cursor,
                                  ending_its_session_by_a_statement)


def _backend_pid(session: Session) -> int:
    return session.execute(text("SELECT pg_backend_pid()")).scalar_one()


@pytest.mark.parametrize("ends_its_session", [ending_its_session_by_a_statement,
                                              ending_its_session_by_a_driver_cursor],
                         ids=["by a statement", "by a driver cursor"])
def test_a_connection_lost_then_connected_again_starts_with_no_loss_noted(in_payments,
                                                                         ends_its_session):
    """A Session bound to a connection of its own (`engine.connect()`) outlives the loss: rolled
    back, it connects again, and what it meets then is not taken for the loss of the connection
    before (a handler's bare error, say, for an outage's)."""
    with db.engine.connect() as connection:
        session = Session(bind=connection)
        lost_pid = _backend_pid(session)
        with pytest.raises(DBAPIError) as lost:
            ends_its_session(session)
        assert connection_lost_on(connection) is lost.value
        try:
            session.rollback()  # (finds the connection broken, and SQLAlchemy invalidates it)
        except DBAPIError as rollback_error:
            assert rollback_error.connection_invalidated
        assert connection_lost_on(connection) is lost.value  # (not connected again yet)
        assert _backend_pid(session) != lost_pid
        assert connection_lost_on(connection) is None
        session.close()


def test_a_statement_on_a_cursor_it_closed_is_no_lost_connection(in_payments):
    """psycopg2's "cursor already closed", a bug of the caller's on a sound connection, which
    SQLAlchemy's dialect takes for a disconnection by its words: the connection goes on."""
    with db.engine.connect() as connection:
        session = Session(bind=connection)
        with pytest.raises(DBAPIError, match="cursor already closed"):
            with driver_cursor(session) as cursor:
                cursor.close()
                cursor.execute("SELECT 1")
        assert connection_lost_on(connection) is None
        assert session.execute(text("SELECT 1")).scalar_one() == 1
        session.close()
