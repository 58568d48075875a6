"""Where tasks find a service: its package, its Flask app (one per process), its handlers, and a
task base class that runs each task inside the app context of the service it names (and, as
IgnoresNewerKwargs, drops the keyword arguments a newer release sends that it does not take)."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from flask import Flask

from shared.config import SERVICES
from tasks.newer_kwargs import IgnoresNewerKwargs

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


def kept_for_the_process(app: Flask) -> bool:
    """Whether `app` is a service's worker app, kept for the process (service_app): the tests
    close every app they build but these, which the tests after them use."""
    with _apps_lock:
        return any(app is kept for kept in _apps.values())


class ServiceTask(IgnoresNewerKwargs):
    """Runs the task body inside the app context of the service named by its first argument; a
    keyword argument the body does not take (sent by a newer release) is dropped and said."""

    abstract = True

    def __call__(self, service: str, *args, **kwargs):
        with service_app(service).app_context():
            return super().__call__(service, *args, **kwargs)
