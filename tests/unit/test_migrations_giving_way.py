"""shared/migrations.py: which failures make an upgrade give way and try again, its pauses, and
when it gives up. (A revision held up by a lock past its lock timeout is tried against PostgreSQL in
tests/integration/test_migrations.py.)"""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa

from shared import migrations


class FakeClock:
    """time.monotonic and time.sleep, with no time passing but what is slept."""

    def __init__(self):
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class FakeConnection:
    rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(migrations.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(migrations.time, "sleep", clock.sleep)
    return clock


def failing(times: int, error: Exception):
    """An upgrade that fails `times` times with `error` (as SQLAlchemy raises it), then succeeds;
    and the list of its calls."""
    calls = []

    def upgrade_once() -> None:
        calls.append(len(calls))
        if len(calls) <= times:
            raise sa.exc.OperationalError("ALTER TABLE outbox_messages ...", {}, error)

    return upgrade_once, calls


def test_a_revision_chosen_as_a_deadlocks_victim_is_tried_again_after_growing_pauses(clock):
    connection = FakeConnection()
    upgrade_once, calls = failing(6, psycopg2.errors.DeadlockDetected("deadlock detected"))
    migrations._giving_way_to_locks(connection, upgrade_once)
    assert len(calls) == 7 and connection.rollbacks == 6
    assert clock.pauses == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_an_upgrade_gives_up_when_its_next_pause_would_end_past_its_time(clock, monkeypatch):
    monkeypatch.setattr(migrations, "GIVE_WAY_FOR_SECONDS", 20.0)
    upgrade_once, calls = failing(99, psycopg2.errors.DeadlockDetected("deadlock detected"))
    with pytest.raises(sa.exc.OperationalError, match="deadlock"):
        migrations._giving_way_to_locks(FakeConnection(), upgrade_once)
    assert clock.pauses == [1.0, 2.0, 4.0, 8.0] and len(calls) == 5  # 15 s, and 10 more is past


def test_any_other_failure_is_not_tried_again(clock):
    upgrade_once, calls = failing(1, psycopg2.OperationalError("server closed the connection"))
    with pytest.raises(sa.exc.OperationalError, match="server closed"):
        migrations._giving_way_to_locks(FakeConnection(), upgrade_once)
    assert len(calls) == 1 and clock.pauses == []
