"""Beat's scheduler and its alive file (tasks/alive.py), without a broker: a beat that stops
removes the file, even when closing its schedule fails."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.beat import Scheduler

from tasks.alive import BEAT_ALIVE_FILE_SETTING, AliveFileScheduler


class _ClosingFails(Scheduler):
    def close(self) -> None:
        raise OSError("the schedule's last sync failed")


class _Scheduler(AliveFileScheduler, _ClosingFails):
    pass


def test_a_beat_whose_closing_fails_removes_its_alive_file_all_the_same(tmp_path):
    path = tmp_path / "alive"
    app = Celery("alive-close-test", set_as_current=False)
    app.conf[BEAT_ALIVE_FILE_SETTING] = str(path)
    scheduler = _Scheduler(app=app, lazy=True)
    scheduler.alive_file.renew()
    with pytest.raises(OSError):
        scheduler.close()
    assert not path.exists()
