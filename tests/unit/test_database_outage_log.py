"""What a loop that retries on a lost database connection says of the outage: once as it begins,
then once a reminder's interval on, and that it is back; never a line per failed try."""

from __future__ import annotations

import logging

import psycopg2
import pytest

from shared.db import DatabaseOutageLog, connection_lost


def test_an_outage_is_said_once_then_once_a_reminder_on_and_its_end_once(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    outage = DatabaseOutageLog(logging.getLogger("test"), "the loop", remind_every=60,
                               clock=lambda: now[0])
    lost = psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably")
    for now[0] in (0.0, 1.0, 29.0, 58.0, 61.0, 62.0):
        outage.lost(lost)
    outage.back()
    outage.back()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "the loop lost its database connection (OperationalError: server closed"
                          " the connection unexpectedly); retrying until it is back"),
        (logging.WARNING, "the loop: database connection still lost after 61 s, 5 tries"
                          " (OperationalError: server closed the connection unexpectedly);"
                          " retrying"),
        (logging.INFO, "the loop: database connection back after 62 s, 6 failed tries"),
    ]
    assert all(r.exc_info is None for r in caplog.records)


def test_a_failed_try_long_after_the_last_begins_a_new_outage_though_none_worked_between(caplog):
    """A consumer whose partitions were taken away during an outage stores nothing after it, so it
    never says the outage ended: a later one is still said as it begins, not as the old one."""
    caplog.set_level(logging.INFO)
    now = [0.0]
    outage = DatabaseOutageLog(logging.getLogger("test"), "the loop", remind_every=60,
                               clock=lambda: now[0])
    lost = psycopg2.OperationalError("server closed the connection unexpectedly")
    for now[0] in (0.0, 1.0, 7200.0, 7201.0):
        outage.lost(lost)
    assert [r.getMessage() for r in caplog.records] == [
        "the loop lost its database connection (OperationalError: server closed the connection"
        " unexpectedly); retrying until it is back"] * 2


@pytest.mark.parametrize("message", [
    "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  the database system is"
    " starting up",
    "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  the database system is"
    " shutting down",
    "FATAL:  terminating connection due to administrator command",
])
def test_a_server_refusing_a_session_as_it_goes_away_or_comes_back_is_a_lost_connection(message):
    assert connection_lost(psycopg2.OperationalError(message))


def test_a_server_refusing_a_session_for_a_reason_of_its_own_is_no_lost_connection():
    assert not connection_lost(psycopg2.OperationalError(
        "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  database \"x\" does not"
        " exist"))
