"""celeryconfig.py is settings only: Celery imports it while the app is being built
(tasks/celery_app.py), so importing it must build no app, which importing the tasks' modules does
(they import tasks.celery_app). What it shares with the tasks is in shared/celery_settings.py."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from kombu.utils.imports import symbol_by_name

import celeryconfig
from shared.celery_settings import REDIS_TRANSPORT_PATH
from shared.config import RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS, SERVICES, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_importing_celeryconfig_imports_nothing_of_the_tasks_package():
    imported = subprocess.run(
        [sys.executable, "-c",
         "import sys, celeryconfig; print(sorted(name for name in sys.modules"
         " if name == 'tasks' or name.startswith('tasks.')))"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
        text=True, check=True)
    assert imported.stdout.strip() == "[]", imported.stdout


def test_the_broker_transport_celeryconfig_names_is_the_shops():
    from tasks.redis_transport import Transport

    assert celeryconfig.broker_transport == REDIS_TRANSPORT_PATH
    assert symbol_by_name(REDIS_TRANSPORT_PATH) is Transport


def test_beat_sends_each_relay_at_least_once_a_second_by_default():
    """Issue 2: Celery beat runs the relay at least once a second as the safety net, so that a
    relay leader that dies is replaced within a second."""
    assert load_settings({}).outbox_relay_interval_seconds == 1
    assert RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS == 1
    relays = {name: entry["schedule"] for name, entry in celeryconfig.beat_schedule.items()
              if entry["task"] == "hseshop.relay_outbox"}
    assert relays == {f"relay-{service}-outbox": timedelta(seconds=1) for service in SERVICES}
