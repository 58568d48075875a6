"""Where tasks find a service: its package, its Flask app (one per process), its handlers, and a
task base class that runs each task inside the app context of the service it names."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from celery import Task
from flask import Flask

from shared.config import SERVICES

_apps: dict[str, Flask] = {}
_apps_lock = threading.Lock()


def service_package(service: str) -> ModuleType:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    return importlib.import_module(f"{service}_app")


def service_app(service: str) -> Flask:
    """The service's Flask app as workers and the operator's commands use it, for its app
    context only, built on first use in this process. It serves no request, so signs and verifies
    nothing: no warning of a published secret from a process that does not use it."""
    with _apps_lock:
        if service not in _apps:
            _apps[service] = service_package(service).create_app(warns_of_published_secrets=False)
        return _apps[service]


class ServiceTask(Task):
    """Runs the task body inside the app context of the service named by its first argument."""

    abstract = True

    def __call__(self, service: str, *args, **kwargs):
        with service_app(service).app_context():
            return super().__call__(service, *args, **kwargs)
