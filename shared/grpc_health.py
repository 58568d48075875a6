"""The standard gRPC health service (grpc.health.v1.Health) on a service's gRPC server, for
probes and load balancers: its Check says the server as a whole ("") and each of its services by
name (hseshop.orders.v1.Orders) are SERVING while the service's database answers, NOT_SERVING
while it does not and once the server begins to stop (begin_stopping); a name it does not serve is
NOT_FOUND.

The database alone: every call of the service's needs it, and none needs more. Redis down costs
only speed (shared.cache) and the broker is the relay's, not the server's (what a call writes goes
to the outbox), so a broker outage that took the servers out of a load balancer's rotation would
refuse the orders the outbox is there to take. Each Check asks, as it comes, GET /health's own
check (its "database": shared.health.database_answers), its rounds shared as theirs are: one at a
time, one a second at most, so a flood of Checks costs the database nothing more; a Check answers
its own caller and sends nothing to anyone else. Like GET /health it says what it found at once;
riding out a blip is the prober's (compose's healthcheck retries).

Check alone is served. Watch answers UNIMPLEMENTED, which health.proto's own comment on Watch
provides for: "If the call terminates with status UNIMPLEMENTED, then clients should assume this
method is not supported and should not retry the call." A Watch holds its stream open for as
long as its client likes, outside the server's limit on the calls it takes in hand (grpcio counts
a non-blocking stream only until its method returns), and pushing each status to every watcher
took the server's threads from the shop's calls; a client wanting changes asks Check again. List
answers UNIMPLEMENTED too.

Its calls take no identity (a probe has none), and tell nothing but these statuses. They share
the server's threads (SERVER_THREADS) and its limit on the calls it takes in hand with the
service's own calls, a trade-off kept: a server whose threads are all busy for longer than a
probe's timeout, or at that limit, is not heard to say SERVING (DEADLINE_EXCEEDED or
RESOURCE_EXHAUSTED: shared.grpc_health_probe exits 1) though its database answers. Compose
publishes no gRPC port, so only a peer inside the stack's network can load a server so."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from flask import Flask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.health import database_answers

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
OVERALL = ""  # the server as a whole
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth(health_pb2_grpc.HealthServicer):
    """The health of a server serving `app`'s `services` (their full names)."""

    def __init__(self, app: Flask, services: Iterable[str]):
        self._app = app
        self._names = frozenset((OVERALL, *services))
        self._stopping = False

    def Check(self, request, context):
        if request.service not in self._names:
            context.abort(grpc.StatusCode.NOT_FOUND, "No such service here.")
        return health_pb2.HealthCheckResponse(status=self._status())

    def Watch(self, request, context):
        _not_supported(context)

    def List(self, request, context):
        _not_supported(context)

    def begin_stopping(self) -> None:
        """The server begins to stop: NOT_SERVING from now on. Only noted: it waits for nothing."""
        self._stopping = True

    def _status(self) -> int:
        if self._stopping:
            return NOT_SERVING
        with self._app.app_context():
            answers = database_answers()
        return SERVING if answers and not self._stopping else NOT_SERVING


def _not_supported(context: grpc.ServicerContext) -> None:
    # (Aborted, not the generated servicer's NotImplementedError, which grpcio logs with its
    # traceback at every call.)
    context.abort(grpc.StatusCode.UNIMPLEMENTED,
                  "Not supported by this server: ask grpc.health.v1.Health/Check.")
