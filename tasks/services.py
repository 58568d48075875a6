"""Where tasks find a service: its package, its Flask app (one per process), its handlers, and a
task base class that runs each task inside the app context of the service it names."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from celery import Task
from flask import Flask

from shared.config import SERVICES

# Workers skip the pool's ping before each transaction (a round trip each, and a worker runs
# thousands of short transactions a second). Everything a worker does is retried when it fails:
# a connection that died with a database restart fails one transaction, which takes the whole
# pool's old connections with it, and the retry runs on a fresh one.
WORKER_CONFIG = {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": False}}

_apps: dict[str, Flask] = {}
_apps_lock = threading.Lock()


def service_package(service: str) -> ModuleType:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    return importlib.import_module(f"{service}_app")


def service_app(service: str) -> Flask:
    """The service's Flask app as workers use it, built on first use in this process."""
    with _apps_lock:
        if service not in _apps:
            _apps[service] = service_package(service).create_app(config=WORKER_CONFIG)
        return _apps[service]


class ServiceTask(Task):
    """Runs the task body inside the app context of the service named by its first argument."""

    abstract = True

    def __call__(self, service: str, *args, **kwargs):
        with service_app(service).app_context():
            return super().__call__(service, *args, **kwargs)
