"""What a loop that retries on a lost database connection says of the outage: once as it begins,
then once a reminder's interval on, and that it is back; never a line per failed try."""

from __future__ import annotations

import logging

import psycopg2

from shared.db import DatabaseOutageLog


def test_an_outage_is_said_once_then_once_a_reminder_on_and_its_end_once(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    outage = DatabaseOutageLog(logging.getLogger("test"), "the loop", remind_every=60,
                               clock=lambda: now[0])
    lost = psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably")
    for now[0] in (0.0, 1.0, 59.0, 61.0, 62.0):
        outage.lost(lost)
    outage.back()
    outage.back()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "the loop lost its database connection (OperationalError: server closed"
                          " the connection unexpectedly); retrying until it is back"),
        (logging.WARNING, "the loop: database connection still lost after 61 s, 4 tries"
                          " (OperationalError: server closed the connection unexpectedly);"
                          " retrying"),
        (logging.INFO, "the loop: database connection back after 62 s, 5 failed tries"),
    ]
    assert all(r.exc_info is None for r in caplog.records)
