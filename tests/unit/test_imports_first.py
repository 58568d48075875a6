"""Each module a process starts from, and each of the package tasks, imports when it is the first
module of the shop's a fresh interpreter imports: a circular import shows only that way (imported
after another, a module finds what it asks for already loaded), as `python -c "import
tasks.relay"` once failed, tasks.celery_app asking tasks.relay for its worker step while
tasks.relay, loading the app, was half loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Started from by name in a setting, not run as `python -m`: gunicorn's worker class and apps
# (docker-compose.yml, devstack), Celery's app (`celery -A tasks`) and configuration files.
NAMED_IN_SETTINGS = ("shared.gunicorn_worker", "orders_app", "payments_app", "gateway_app",
                     "tasks", "celeryconfig", "flowerconfig")
PACKAGES = ("shared", "tasks", "devstack", "bench", "orders_app", "payments_app", "gateway_app")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _entry_modules() -> list[str]:
    """Every module of the package tasks, and each module of the others run as `python -m`."""
    modules = set(NAMED_IN_SETTINGS)
    modules.update(_module_name(path) for path in (REPO_ROOT / "tasks").glob("*.py"))
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text():
                modules.add(_module_name(path))
    return sorted(modules)


def test_the_modules_checked_include_the_commands_and_every_task_module():
    modules = _entry_modules()
    assert {"tasks.relay", "tasks.consumer", "tasks.parked", "shared.migrations",
            "shared.grpc_server", "devstack.__main__", "bench.__main__"} <= set(modules)


@pytest.mark.parametrize("module", _entry_modules())
def test_a_module_a_process_starts_from_imports_first(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_workers_steps_named_in_the_app_are_the_steps_celery_loads():
    """The app names its worker steps for Celery to load as a worker starts (tasks.celery_app):
    each name is a step."""
    from celery import bootsteps
    from celery.worker.consumer import Consumer
    from celery.worker.worker import WorkController

    from tasks.celery_app import app

    workers = WorkController.Blueprint(steps=app.steps["worker"]).claim_steps()
    consumers = Consumer.Blueprint(steps=app.steps["consumer"]).claim_steps()
    assert {"tasks.consumer.InboxConsumerStep", "tasks.relay.StopLeadingStep",
            "tasks.hung_tasks.HungTaskWatchStep"} <= set(workers)
    assert "tasks.alive.AliveFileStep" in consumers
    assert all(issubclass(step, bootsteps.Step) for step in [*workers.values(),
                                                              *consumers.values()])
