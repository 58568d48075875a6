"""A worker's clock that runs behind the database's, for tests of which clock a timestamp is."""

from __future__ import annotations

from datetime import datetime, timedelta


class AnHourBehind(datetime):
    """datetime, but now() and utcnow() an hour early: put in place of a module's `datetime`."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) - timedelta(hours=1)

    @classmethod
    def utcnow(cls):
        return datetime.utcnow() - timedelta(hours=1)
