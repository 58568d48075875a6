"""The standard gRPC health service (grpc.health.v1.Health, grpcio-health-checking's servicer) on
a service's gRPC server, for probes and load balancers: the server as a whole ("") and each of its
services by name (hseshop.orders.v1.Orders) are SERVING while the service's database answers, and
NOT_SERVING while it does not and once the server begins to stop.

The database alone: every call of the service's needs it, and none needs more. Redis down costs
only speed (shared.cache) and the broker is the relay's, not the server's (what a call writes goes
to the outbox), so a broker outage that took the servers out of a load balancer's rotation would
refuse the orders the outbox is there to take. The check is GET /health's own (its "database":
shared.health.database_answers), its rounds shared as theirs are: one at a time, one a second at
most, so a flood of health calls costs the database nothing more. Like GET /health it says what it
found at once; riding out a blip is the prober's (compose's healthcheck retries).

Its calls take no identity (a probe has none), and tell nothing but these statuses. A Watch holds
no server thread (the servicer's non-blocking streams), hears a change as a check finds it (each
Check, each new Watch) and the stop at once, then ends: a stop does not wait a Watch out."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from flask import Flask
from grpc_health.v1 import health, health_pb2

from shared.health import database_answers

SERVICE_NAME = health.SERVICE_NAME  # grpc.health.v1.Health
OVERALL = health.OVERALL_HEALTH  # "": the server as a whole
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth(health.HealthServicer):
    """The health of a server serving `app`'s `services` (their full names)."""

    def __init__(self, app: Flask, services: Iterable[str]):
        super().__init__(experimental_non_blocking=True)
        self._app = app
        self._names = (OVERALL, *services)
        self._watch_lock = threading.Lock()
        self._stopping = False
        # The open Watches' ways to answer, ended at the stop (None ends a stream).
        self._watches: set[Callable[[object], None]] = set()
        for name in self._names:  # (known from the start; checked before any answer)
            self.set(name, NOT_SERVING)

    def Check(self, request, context):
        self._check(request.service)
        return super().Check(request, context)

    def Watch(self, request, context, send_response_callback=None):
        self._check(request.service)
        with self._watch_lock:
            watch = super().Watch(request, context, send_response_callback)
            stopping = self._stopping
            if not stopping:
                self._watches.add(send_response_callback)
                context.add_callback(lambda: self._forget(send_response_callback))
        if stopping:  # (its first answer was NOT_SERVING: nothing more will come)
            send_response_callback(None)
        return watch

    def stopping(self) -> None:
        """The server begins to stop: NOT_SERVING from now on, every open Watch told at once and
        its stream then ended."""
        self.enter_graceful_shutdown()
        with self._watch_lock:
            self._stopping = True
            watches, self._watches = self._watches, set()
        for send_response_callback in watches:
            send_response_callback(None)

    def _check(self, name: str) -> None:
        if name not in self._names or self._stopping:
            return
        with self._app.app_context():
            status = SERVING if database_answers() else NOT_SERVING
        for each in self._names:  # (ignored once stopping: enter_graceful_shutdown)
            self.set(each, status)

    def _forget(self, send_response_callback) -> None:
        with self._watch_lock:
            self._watches.discard(send_response_callback)
