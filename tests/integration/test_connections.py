"""Every connection the shop opens to PostgreSQL gives up on a database it cannot hear from
(shared.db.CONNECTION_TIMEOUTS) instead of waiting on the kernel for minutes or hours, and its
session holds the others up for a bounded time only (shared.db.SESSION_LIMITS): the pooled ones
of the APIs and handlers, the inbox consumer's own and the relay leader's."""

from __future__ import annotations

from shared.db import CONNECTION_TIMEOUTS, SESSION_LIMITS, SESSION_OPTIONS, db
from shared.relay_leader import RelayLeaderConnection

EXPECTED = {name: str(value) for name, value in {**CONNECTION_TIMEOUTS, **SESSION_OPTIONS}.items()}


def _timeouts(connection) -> dict[str, str]:
    """The connection's timeouts as it was opened, and the limits its session runs under."""
    parameters = connection.get_dsn_parameters()
    with connection.cursor() as cursor:
        limits = {}
        for name in SESSION_LIMITS:
            cursor.execute(f"SHOW {name}")
            limits[name] = cursor.fetchone()[0]
    assert limits == SESSION_LIMITS
    return {name: parameters.get(name) for name in EXPECTED}


def test_pooled_connections_give_up_on_a_silent_database(in_payments):
    pooled = db.session.connection().connection.driver_connection
    try:
        assert _timeouts(pooled) == EXPECTED
    finally:
        db.session.rollback()


def test_the_consumers_and_the_relay_leaders_own_connections_do_too(settings, payments_inbox):
    assert payments_inbox([]) == []  # (its connection is opened for the first batch)
    assert _timeouts(payments_inbox._connection) == EXPECTED
    with RelayLeaderConnection(settings.database_url("payments")) as leader:
        assert _timeouts(leader._connection) == EXPECTED
