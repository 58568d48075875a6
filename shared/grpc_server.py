"""Serving a service's operations over gRPC, next to its HTTP API and calling the same endpoint
functions: identity and deadline from gateway-signed call metadata, the request id bound for the
call, errors turned into gRPC status codes that carry the HTTP status, code and details the HTTP
API would give, and a replayed answer marked in the trailers as the HTTP API marks it in a
header.

    python -m shared.grpc_server orders      # listens on ORDERS_GRPC_BIND, with reflection
                                             # and the health service (shared.grpc_health)
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import contextvars
import importlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from flask import Flask
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from marshmallow import ValidationError

from shared.caller_deadline import COMMIT_GRACE_SECONDS, deadline_given
from shared.config import settings_or_exit
from shared.db import CallerGaveUp, caller_waits_until
from shared.errors import DATABASE_ERRORS, ApiError, CallerDeadlinePassed, database_error
from shared.grpc_health import SERVICE_NAME as HEALTH_SERVICE_NAME
from shared.grpc_health import ServiceHealth
from shared.idempotency import REPLAYED, checked_idempotency_key, take_replayed_mark
from shared.identity import authenticated_user_id
from shared.internal_auth import DEADLINE_HEADER, GRPC_METHOD, header_value
from shared.quiet_interrupt import INTERRUPTED, flush_standard_streams
from shared.request_context import (REQUEST_ID_HEADER, configure_logging, escaped_in_logs,
                                    given_request_id_if_sane, request_id_bound, sane_request_id)

# By its name, not __name__: run as `python -m shared.grpc_server`, that is `__main__`, which its
# log lines would show.
log = logging.getLogger("shared.grpc_server")

# Trailing metadata of a failed call: what the HTTP API would have answered.
HTTP_STATUS_KEY = "hseshop-http-status"
ERROR_CODE_KEY = "hseshop-error-code"
ERROR_DETAILS_KEY = "hseshop-error-details"
RETRY_AFTER_KEY = "hseshop-retry-after"  # only when the HTTP answer would carry Retry-After
# Trailing metadata of a call answered with a replay (shared.idempotency), REPLAYED: where the HTTP
# answer carries Idempotent-Replayed: true (a reply's, or a refusal's kept under its key).
REPLAYED_KEY = "hseshop-idempotent-replayed"

# Keepalive between the gateway's channels and these servers. A connection to a service that went
# silent (its host gone without a word, as when a container is replaced and its address with it)
# is found out by HTTP/2 pings and dropped, and the channel connects afresh, resolving the name
# again; without them every call on it would wait out its deadline for as long as TCP keeps it.
KEEPALIVE_TIME_MS = 20_000  # a client pings a connection quiet this long, calls or none
KEEPALIVE_TIMEOUT_MS = 10_000  # and drops it when the ping is not answered this soon
# A server takes pings this often without calls (the client's must come no more often, or the
# server counts them as misbehaving and closes the connection).
PINGS_ACCEPTED_EVERY_MS = 10_000
# How often a channel tries a service it cannot connect to again, at most: gRPC's own backoff
# grows to two minutes, and every call in between fails at once (503), so a service back after a
# few minutes down would stay unreachable for up to two more. A connection attempt a second to a
# service of the same deployment costs next to nothing. It is the address it last looked up that
# a channel tries again: see DNS_LOOKUPS_AT_MOST_EVERY_MS for a service back at another.
RECONNECT_BACKOFF_MS = (500, 1000)  # the first wait, and the longest
# How soon a channel looks its target's name up again, at most, after its last lookup, when it
# loses its connection or cannot make one. gRPC's own is 30 s: a service redeployed to another
# address (a container replaced) was tried at its old one, every call a 503, for up to half a
# minute after the move (27 s measured); with a second, the next try finds it (0.5 s measured).
# A lookup a second, and only while the service is unreachable, costs next to nothing.
# (A lookup that fails is another matter: gRPC's resolver backs off from it, 1 s growing by 1.6
# times a try to two minutes, and no channel argument changes that: a name that stopped resolving
# for long, its container gone, was looked up again up to two minutes after it came back. For
# that the gateway gives a service's calls a channel made afresh, its name looked up at once,
# once they have all failed unsent for a few seconds: gateway_app/upstream_grpc.py,
# CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS.)
DNS_LOOKUPS_AT_MOST_EVERY_MS = 1000
# How long a channel tries to connect (TCP, then the server's HTTP/2 SETTINGS) before it gives up
# and fails the calls waiting for it as unreachable (UNAVAILABLE, "failed to connect to all
# addresses": a 503), as the HTTP transport's connect timeout does (gateway_app/upstream_http.py).
# gRPC's own is 20 s: a service whose host answers nothing (gone with its address, cut off, its
# listen queue full) held every call to its deadline, a 504 "may still have taken effect" for a
# call never sent, for as long as each attempt lasted.
CONNECT_TIMEOUT_MS = 1000


def channel_options() -> list[tuple[str, int]]:
    """The options of a channel to these servers: keepalive as they accept it, reconnecting
    within RECONNECT_BACKOFF_MS, its target's name looked up again within
    DNS_LOOKUPS_AT_MOST_EVERY_MS, and each connection made within CONNECT_TIMEOUT_MS (gRPC core
    reads that from min_reconnect_backoff_ms, its minimum connect timeout). (gRPC core holds a
    ping back for min_time_between_pings, five minutes unless set, once none answered, and drops
    the connection after ping_timeout, not keepalive_timeout: both are set here.)"""
    first_wait_ms, longest_wait_ms = RECONNECT_BACKOFF_MS
    return [("grpc.initial_reconnect_backoff_ms", first_wait_ms),
            ("grpc.max_reconnect_backoff_ms", longest_wait_ms),
            ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
            ("grpc.dns_min_time_between_resolutions_ms", DNS_LOOKUPS_AT_MOST_EVERY_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", KEEPALIVE_TIME_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS)]


def _server_options(connection_age_seconds: float,
                    connection_grace_seconds: float) -> list[tuple[str, int]]:
    """Pings taken as the gateway's channels send them, each connection closed at its age
    (CONNECTION_AGE_SECONDS) once the calls in flight on it are given their grace, and the
    server's port its own: with SO_REUSEPORT, grpc-core's default, a second server on a port a
    first (a stale one) holds started silently, and the kernel shared the connections out between
    them."""
    return [("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", PINGS_ACCEPTED_EVERY_MS),
            ("grpc.max_connection_age_ms", round(connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", round(connection_grace_seconds * 1000)),
            ("grpc.so_reuseport", 0)]


GRPC_CODE_FOR_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,  # (its database unavailable or busy: try again shortly)
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # (CALLER_GAVE_UP: its work rolled back)
}


@dataclass(frozen=True)
class UndecodableRequest:
    """What a method gets for bytes that are no request of its type (add_servicer)."""

    error: str


@dataclass(frozen=True)
class _Received:
    """A call's request as it came, for the gateway's signature (shared.internal_auth), which is
    over the method called and the request's bytes as sent: `request` the message parsed from
    `raw` (or an UndecodableRequest)."""

    request: Any
    raw: bytes


# What the gateway signed of the call being served (its method's full name, its request's bytes),
# set by add_servicer's behaviours for serve_call's check of the caller's signature.
_being_served: contextvars.ContextVar[tuple[str, bytes]] = contextvars.ContextVar(
    "hseshop_grpc_call_signed")
# The call's metadata as _metadata_as_headers gives it, joined once a call: by CallLogInterceptor
# as the call arrives, for serve_call. grpcio runs a call's interceptors and its behaviour in one
# contextvars.Context of that call's own (since 1.60: grpc/grpc#34291), so a call reads its own
# metadata there, and never another call's.
_call_metadata: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "hseshop_grpc_call_metadata")


def add_servicer(server: grpc.Server, servicer: Any, messages: ModuleType, service: str) -> str:
    """Register `servicer`'s methods of `service` (described in the `messages` module, protoc's
    *_pb2), as protoc's add_*Servicer_to_server does, but for how requests are parsed: bytes that
    are no request of the method's type reach it as an UndecodableRequest, which serve_call
    answers with 400 MALFORMED_REQUEST once the caller's identity is checked, as the HTTP API
    answers a body it cannot read; gRPC's own parse answered INTERNAL, before any check. The
    request's bytes and the method's full name are kept for serve_call, which checks the caller's
    signature against them. Returns the service's full name."""
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _serving(getattr(servicer, method.name), f"/{descriptor.full_name}/{method.name}"),
            request_deserializer=_parsed_leniently(getattr(messages, method.input_type.name)),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString)
        for method in descriptor.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
    return descriptor.full_name


def _parsed_leniently(request_type) -> Callable[[bytes], _Received]:
    def parse(raw: bytes) -> _Received:
        try:
            return _Received(request_type.FromString(raw), raw)
        except DecodeError as exc:
            return _Received(UndecodableRequest(str(exc)), raw)

    return parse


def _serving(behaviour: Callable[[Any, grpc.ServicerContext], Any],
             full_method: str) -> Callable[[_Received, grpc.ServicerContext], Any]:
    """`behaviour` (a servicer's method) given the request parsed, with what came for it kept for
    serve_call while it runs."""
    def serve(received: _Received, context: grpc.ServicerContext) -> Any:
        token = _being_served.set((full_method, received.raw))
        try:
            return behaviour(received.request, context)
        finally:
            _being_served.reset(token)

    return serve


def given(request: Any, *names: str) -> dict[str, Any]:
    """The fields of `request` the caller set (optional in the .proto, so that proto3 tells unset
    from empty), by name: what an HTTP body or query would hold, and a field left out is refused
    or defaulted by the schema as over HTTP."""
    return {name: getattr(request, name) for name in names if request.HasField(name)}


def idempotency_key_given(request: Any) -> str | None:
    """The call's Idempotency-Key, checked as over HTTP: none when the field is unset, a 400 for
    one that is no usable key, an empty one sent included."""
    return checked_idempotency_key(given(request, "idempotency_key").get("idempotency_key"))


def _metadata_as_headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """A call's metadata by key, the values of a key given more than once joined by a comma, as
    an HTTP server hands a service a header given twice ("a,b": gunicorn, Werkzeug). The identity
    is checked against this mapping and the deadline read from it, so both see one value, as over
    HTTP: an unsigned x-gateway-deadline added to a captured call's changes the value signed, 401
    UNTRUSTED_IDENTITY (the last value alone was checked, and the joined one then read: 400
    INVALID_DEADLINE). A "-bin" key's bytes are left out: nothing here reads one."""
    joined: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            joined.setdefault(key, []).append(value)
    return {key: ",".join(values) for key, values in joined.items()}


def serve_call(app: Flask, context: grpc.ServicerContext, request: Any,
               operation: Callable[[str], Any], location: str = "json") -> Any:
    """Run `operation(user_id)` for one call of `request`, as an HTTP route runs for one request.
    `location`: where the HTTP API reads what the request holds (its body, or its "query"), under
    which a validation error's messages are filed, as there."""
    metadata = _call_metadata.get(None)
    if metadata is None:  # (a server built without it: build_server's have it)
        log.error("a gRPC call served without CallLogInterceptor, which keeps the call's metadata"
                  " for serve_call: its server is to be built by build_server; answered INTERNAL")
        context.abort(grpc.StatusCode.INTERNAL, "The call was served without CallLogInterceptor.")
    request_id = sane_request_id(metadata.get(REQUEST_ID_HEADER.lower()))
    with app.app_context(), request_id_bound(request_id):
        try:
            secret = app.extensions["hseshop.settings"].internal_auth_secret
            full_method, raw = _being_served.get()  # (set for a method add_servicer's only)
            user_id = authenticated_user_id(metadata, secret, GRPC_METHOD, full_method, raw)
            # (A malformed deadline is a 400 INVALID_DEADLINE, as over HTTP, where it is read
            # once the identity is verified and before the body is parsed.)
            deadline = _earliest_deadline(context, metadata)
            if isinstance(request, UndecodableRequest):
                raise ApiError("The request is not a valid message of its type.",
                               code="MALFORMED_REQUEST", details={"message": [request.error]})
            with caller_waits_until(deadline):
                reply = operation(user_id)
            if take_replayed_mark():
                context.set_trailing_metadata(((REPLAYED_KEY, REPLAYED),))
            return reply
        except ValidationError as exc:
            _abort(context, ApiError("The request is not valid.", status=422,
                                     code="VALIDATION_ERROR", details={location: exc.messages}))
        except ApiError as exc:
            # (A refusal kept under the call's Idempotency-Key and answered again is marked, as
            # a reply is.)
            _abort(context, exc, replayed=take_replayed_mark())
        except DATABASE_ERRORS as exc:
            log.warning("database unavailable or busy: %s", getattr(exc, "orig", exc))
            _abort(context, database_error(exc))
        except CallerGaveUp:
            log.warning("the caller's deadline passed before the call's work could commit;"
                        " rolled back")
            # With the trailers of the HTTP API's 504 CALLER_GAVE_UP, as every error of the
            # service's, so that the gateway tells its client nothing was done: a bare
            # DEADLINE_EXCEEDED is one the gateway cannot tell from its own timer's ("may still
            # have taken effect").
            _abort(context, CallerDeadlinePassed())
        except Exception:
            log.exception("unhandled error in a gRPC call [request_id=%s]", request_id)
            context.abort(grpc.StatusCode.INTERNAL, "Something went wrong on our side.")


def _earliest_deadline(context: grpc.ServicerContext, metadata: dict[str, str]) -> float | None:
    """The time.monotonic() by which the call's work commits or rolls back: the earlier of the
    call's own deadline (its gRPC timeout, which whoever sends the call sets, and nobody signs)
    and the moment the gateway signed into its metadata (X-Gateway-Deadline in lower case,
    shared.caller_deadline), so that a captured call sent again with a longer timeout still
    rolls back once the gateway has answered 504. Read only once the call's identity check, which
    requires the signed moment (shared.internal_auth), has passed: anyone's call with a moment
    long past would have the service log that it came after its caller's deadline. A moment of
    another form than the header's is refused, ApiError 400 INVALID_DEADLINE (INVALID_ARGUMENT),
    as over HTTP. `metadata`: the call's, as _metadata_as_headers gives it, whose deadline the
    signature was checked against."""
    remaining = context.time_remaining()  # (no deadline set: about 9.2e18 s; None in some grpcio)
    deadlines = (None if remaining is None else time.monotonic() + remaining,
                 deadline_given(header_value(metadata, DEADLINE_HEADER)))
    return min((deadline for deadline in deadlines if deadline is not None), default=None)


def _abort(context: grpc.ServicerContext, error: ApiError, replayed: bool = False) -> None:
    """End the call with what the HTTP API would have answered for `error`, in the trailers
    (`replayed`: it answers an earlier call under the same Idempotency-Key, REPLAYED_KEY).
    grpc-core drops a trailer over 16 KiB (the details', for one), and the gateway answers a
    failure whose details are missing 502: the services' details are far shorter."""
    trailers = [
        (HTTP_STATUS_KEY, str(error.status)),
        (ERROR_CODE_KEY, error.code),
        (ERROR_DETAILS_KEY, json.dumps(error.details or {}, default=str)),
    ]
    if "Retry-After" in error.headers:
        trailers.append((RETRY_AFTER_KEY, error.headers["Retry-After"]))
    if replayed:
        trailers.append((REPLAYED_KEY, REPLAYED))
    context.set_trailing_metadata(tuple(trailers))
    context.abort(GRPC_CODE_FOR_HTTP_STATUS.get(error.status, grpc.StatusCode.UNKNOWN),
                  error.message)


class CallLogInterceptor(grpc.ServerInterceptor):
    """One log line per call, as it arrives (before its identity is checked, on the server's own
    thread), with the request id the gateway sent: the gRPC access log. What the caller wrote is
    logged as the HTTP access log logs it: the method with its control characters escaped (a
    line break in it wrote a log line of the caller's making), and the id only if it is sane.
    The call's metadata, joined, is kept for serve_call (_call_metadata)."""

    def intercept_service(self, continuation, handler_call_details):
        metadata = _metadata_as_headers(handler_call_details.invocation_metadata)
        _call_metadata.set(metadata)
        with request_id_bound(given_request_id_if_sane(metadata.get(REQUEST_ID_HEADER.lower()))):
            log.info("gRPC %s", escaped_in_logs(handler_call_details.method))
        return continuation(handler_call_details)


# Calls a server runs at once, each on a thread of its own (and with a database connection).
SERVER_THREADS = 16
# Calls a server takes in hand at once, a thread's worth each, those waiting for a thread among
# them: one more is refused at once, RESOURCE_EXHAUSTED with no trailers of the service's (the
# gateway's 503 with Retry-After), where it was queued without bound to wait out its deadline.
CALLS_IN_HAND_PER_THREAD = 4
# How long a server keeps a connection: at this age (give or take a tenth, grpc-core's jitter) it
# tells the client to make its new calls on a new one (an HTTP/2 GOAWAY: the gateway's channels
# reconnect, and a call caught on its way is sent again by grpc-core, which knows the server never
# took it), gives the calls in flight on it the grace below, then closes it, cancelling those left.
# That bounds how long a call whose request never comes holds a thread: grpcio reads a call's
# request on one of the server's threads, with no timeout, and checks its identity only once it
# has come, so anyone who reached the port held a thread a call for as long as they liked, and
# SERVER_THREADS such calls held up every other (as REQUEST_READ_TIMEOUT_SECONDS bounds it over
# HTTP).
CONNECTION_AGE_SECONDS = 30
# The grace: the gateway's deadline for a call (UPSTREAM_TIMEOUT_SECONDS, the services read the
# same setting), the COMMIT_GRACE_SECONDS it waits past it for the answer, and a second more, so
# that no call the gateway still waits for is cut off.
GRACE_PAST_THE_GATEWAYS_WAIT_SECONDS = 1


def calls_grace(upstream_timeout_seconds: float) -> float:
    """What a call in flight is given when its connection is closed at its age, or its server
    stops: as long as the gateway may wait for its answer, and a second more."""
    return upstream_timeout_seconds + COMMIT_GRACE_SECONDS + GRACE_PAST_THE_GATEWAYS_WAIT_SECONDS


# Each server's health service, told by begin_stopping.
_HEALTH_OF: weakref.WeakKeyDictionary[grpc.Server, ServiceHealth] = weakref.WeakKeyDictionary()


def build_server(service: str, app: Flask, bind: str, max_workers: int = SERVER_THREADS,
                 connection_age_seconds: float = CONNECTION_AGE_SECONDS) -> grpc.Server:
    """A server with the service's methods (its `grpc_api.register`), the health service
    (shared.grpc_health) and reflection, bound; a RuntimeError if it cannot listen on `bind`
    (taken by another server, say)."""
    grace = calls_grace(app.extensions["hseshop.settings"].upstream_timeout_seconds)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix=f"{service}-grpc"),
                         interceptors=[CallLogInterceptor()],
                         options=_server_options(connection_age_seconds, grace),
                         maximum_concurrent_rpcs=CALLS_IN_HAND_PER_THREAD * max_workers)
    grpc_api = importlib.import_module(f"{service}_app.grpc_api")
    service_names = grpc_api.register(server, app)
    health = _HEALTH_OF[server] = ServiceHealth(app, service_names)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(bind) == 0:
        raise RuntimeError(f"cannot listen on {bind}")
    return server


def begin_stopping(server: grpc.Server) -> None:
    """Have `server`'s (build_server's) health service say NOT_SERVING from now on: a flag set,
    nothing waited for. Called just before its stop, which refuses every call after it, health
    calls too (UNAVAILABLE, which a probe reads as unhealthy alike): a Check made in between
    hears NOT_SERVING. Nothing is drained by it."""
    _HEALTH_OF[server].begin_stopping()


# What a stop gives the calls in flight before it cancels them; None: calls_grace, as long as the
# gateway may wait for an answer and a second more (README: 7 s by default). It gave 5 s, the
# gateway's deadline alone: a COMMIT begun just before it, which the gateway still waits for, was
# cut off at a deploy.
STOP_GRACE: float | None = None


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(prog="python -m shared.grpc_server")
    parser.add_argument("service", choices=("orders", "payments"))
    args = parser.parse_args(argv)
    stopped = threading.Event()
    received: list[int] = []

    def stop(signum, frame) -> None:
        # Only noted: the main thread acts on it (gRPC's stop called from the handler would run
        # amid whatever the main thread was doing, its own stop for one).
        received.append(signum)
        stopped.set()

    # SIGTERM taken first: build_server's add_insecure_port already listens (a connect succeeds,
    # which devstack takes for ready), and a SIGTERM before it was taken (or as the settings
    # were read, the app made) killed it, exit 143, "stopped" never said.
    signal.signal(signal.SIGTERM, stop)
    configure_logging()
    # (A setting it cannot take said in a line, its password hidden, not a traceback.)
    settings = settings_or_exit(f"{args.service} gRPC: nothing served", log)
    package = importlib.import_module(f"{args.service}_app")
    bind = getattr(settings, f"{args.service}_grpc_bind")
    # A stop signal come as it read its settings or made its app: nothing more made, nothing
    # bound (a bind that then failed exited 1 with a traceback, not stopped).
    server = None
    if not stopped.is_set():
        app = package.create_app()
        if not stopped.is_set():
            server = build_server(args.service, app, bind)
    # Ctrl-C taken so once it is about to serve: till then it ends it at once, quietly, nothing
    # served (run_main), a slow start (the app made) cut short. Ignored, as in a job a script
    # started in the background (`... &`), it stays ignored (shared.quiet_interrupt), SIGTERM
    # what stops it.
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)
    if server is not None:
        grace = (calls_grace(settings.upstream_timeout_seconds) if STOP_GRACE is None
                 else STOP_GRACE)
        if not stopped.is_set():  # (a stop signal come before it serves: not started, stopped)
            server.start()
            log.info("%s gRPC listening on %s", args.service, bind)
            stopped.wait()
            log.info("%s gRPC stopping: its calls in flight given %g s (a second Ctrl-C or"
                     " SIGTERM: none)", args.service, grace)
        begin_stopping(server)
        done = server.stop(grace=grace)
        # A second stop signal, come before the grace began or during it: the calls in flight
        # cut short, not waited for.
        while len(received) < 2 and not done.wait(0.1):
            pass
        if not done.is_set():
            server.stop(0)
            done.wait()
    log.info("%s gRPC stopped", args.service)
    # Stopped by Ctrl-C, it then dies of SIGINT as the operator's commands do (run_main), for a
    # script running it to stop too; stopped by SIGTERM (a deploy, compose), it exits 0. Either
    # at once: a call the grace cut short may still run on its thread (a handler asleep), which
    # a normal exit would wait for, past the grace.
    if received[0] == signal.SIGINT:
        return INTERRUPTED
    logging.shutdown()  # (what is logged, flushed)
    flush_standard_streams()  # (and what was printed)
    os._exit(0)


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main

    # The main of the module as the services import it (orders_app.grpc_api), not of this copy
    # run as `__main__`: one module serves, so that what CallLogInterceptor keeps for a call is
    # what serve_call reads (each copy has a _call_metadata of its own).
    from shared.grpc_server import main as main_of_the_module
    run_main(main_of_the_module)
