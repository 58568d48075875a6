"""Routing /api/... to the service that owns it, passing method, body, query, status and the
Idempotency-Key through, with the caller's identity signed by the gateway and the request id.

A service that cannot be reached answers 503, one too slow 504, one that fails (or refuses the
gateway's signed identity, or answers what is no answer of its API: not JSON, a redirect) 502:
always the usual JSON error, never a hang and never a stack trace. "Too slow" is one deadline for
the whole call (UPSTREAM_TIMEOUT_SECONDS, as over gRPC), its connection, its answer's headers and
its body, each read waiting only for what is left of it: a read timeout alone starts again with
each byte, so an answer dripping a byte a second held the gateway's thread, and its client, for
as long as it dripped. The connection of an answer cut off is closed, never pooled.
A service that answers 503 itself, with the usual JSON error (its database unavailable, say), is
relayed as it is, Retry-After included.

Connections are kept alive and pooled, and a service closes one idle past its keep-alive (2 s,
gunicorn's default) whenever it likes: just as the gateway sends a request on it, say, and the
request then fails before a byte of an answer comes, though the service has most likely not seen
it. A request that fails so on a connection that carried one before is sent once more, on a new
connection, within the same deadline, where that is safe: a GET, or a POST with an
Idempotency-Key (the service answers a repeat with the first answer). A POST without one is a
502, as is a request closed without an answer on a connection made for it, or after a byte of
one: the service may have carried it out.
"""

from __future__ import annotations

import http.client
import io
import logging
import threading
import time

import requests
from flask import Response, current_app, g, request
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError, ReadTimeoutError
from webargs.flaskparser import is_json_request

from shared.errors import BadGateway, ServiceUnavailable, UpstreamTimeout
from shared.idempotency import IDEMPOTENCY_HEADER, idempotency_key_from_request
from shared.internal_auth import identity_headers
from shared.request_context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 1.0
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Retry-After")

_sessions = threading.local()


class _Call(threading.local):
    """The call this thread is making: each thread has a session of its own (below), so the
    connections of its pools carry this thread's calls only."""

    deadline: float | None = None  # time.monotonic() by which the whole answer is read
    kept_alive = False  # its request went on a connection that had carried one before
    answered = False  # a byte of an answer to it came

    def begin(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.kept_alive = self.answered = False


_call = _Call()


class _ReadAgainstTheDeadline(io.RawIOBase):
    """An answer's reads off its connection's socket, each waiting at most for what is left of
    the call's deadline (TimeoutError once it has passed), where each waited the read timeout."""

    def __init__(self, raw: io.RawIOBase, sock):
        super().__init__()
        self._raw, self._sock = raw, sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        if _call.deadline is not None:
            left = _call.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the call's deadline has passed")
            self._sock.settimeout(left)
        received = self._raw.readinto(buffer)
        if received:
            _call.answered = True
        return received

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _AnswerAgainstTheDeadline(http.client.HTTPResponse):
    """http.client's answer (status line, headers, body: urllib3 reads it all through this),
    reading against the call's deadline."""

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # The socket's own file, unread yet, taken from its buffer and read through the deadline.
        self.fp = io.BufferedReader(_ReadAgainstTheDeadline(self.fp.detach(), sock))


class _TellingIfKeptAlive:
    """A connection telling the call whether its request went on a socket that had carried one
    before (kept alive, from the pool) or on one made for it."""

    response_class = _AnswerAgainstTheDeadline
    _carried = 0  # requests sent on its socket

    def connect(self) -> None:
        super().connect()
        self._carried = 0

    def request(self, *args, **kwargs) -> None:
        # (Over HTTP a connection made for the request connects inside super().request.)
        _call.kept_alive = self.sock is not None and self._carried > 0
        _call.answered = False
        super().request(*args, **kwargs)
        self._carried += 1


class _Connection(_TellingIfKeptAlive, HTTPConnection):
    pass


class _TLSConnection(_TellingIfKeptAlive, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter, its pools making the connections above."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


def _http() -> requests.Session:
    # One pooled session per thread: requests' Session is not meant to be shared across threads.
    if not hasattr(_sessions, "session"):
        session = requests.Session()
        for scheme in ("http://", "https://"):
            session.mount(scheme, _Adapter())
        _sessions.session = session
    return _sessions.session


def forward(service: str, path: str, idempotent: bool = False) -> Response:
    """Send the current request to `service` at `path` and relay its answer; `idempotent` for
    the routes that honour an Idempotency-Key.

    Of the client's request only what the gRPC transport passes on goes too, so that both answer
    alike: the key where it counts (checked here, as the gRPC route checks it), and a JSON body,
    which the gateway has already parsed, with its type; a body of another type, which the
    gateway's parsing passed over, stays behind. (Nothing else a client sends can then make a
    header that HTTP cannot carry.)"""
    settings = current_app.extensions["hseshop.settings"]
    base = {"orders": settings.orders_service_url,
            "payments": settings.payments_service_url}[service]
    headers = identity_headers(g.user_id, settings.internal_auth_secret)
    key = idempotency_key_from_request() if idempotent else None
    if key:
        headers[IDEMPOTENCY_HEADER] = key
    # A body only where the route takes one: the gRPC transport reads none on a GET (nor would the
    # service), so a big one there is no 413 over HTTP either.
    body = request.get_data() if request.method == "POST" and is_json_request(request) else b""
    if body:
        headers["Content-Type"] = "application/json"
    headers[REQUEST_ID_HEADER] = current_request_id() or ""
    # The query as the gateway read it (and the gRPC transport passes it on), encoded afresh: the
    # string as typed, "%35" or an escape that is none ("%zz"), would reach the service as
    # something else ("%2535": requests quotes every "%" again once one is not an escape).
    query = list(request.args.items(multi=True))
    _call.begin(settings.upstream_timeout_seconds)
    try:
        upstream = _sent(
            service, request.method == "GET" or key is not None,
            request.method, f"{base}{path}", params=query, data=body, headers=headers,
            allow_redirects=False,
            timeout=(CONNECT_TIMEOUT_SECONDS, settings.upstream_timeout_seconds))
    except requests.ConnectionError as exc:
        if exc.args and isinstance(exc.args[0], ReadTimeoutError):
            # Its answer begun, and its body stalled or too slow to come whole by the deadline
            # (requests calls that a connection error).
            log.warning("%s timed out in the middle of its answer", service)
            raise UpstreamTimeout.of(service) from None
        if exc.args and isinstance(exc.args[0], ProtocolError):
            # Connected, and closed without an answer (its worker killed, say): the request may
            # have been carried out, which "unavailable" would deny.
            log.warning("%s closed the connection without answering: %r", service, exc)
            raise BadGateway.of(service) from None
        # Refused, unresolvable, or no connection in time.
        log.warning("%s unreachable: %s", service, exc)
        raise ServiceUnavailable.of(service) from None
    except requests.Timeout:  # connected, but no answer (or not its headers) in time
        log.warning("%s timed out", service)
        raise UpstreamTimeout.of(service) from None
    except requests.RequestException as exc:  # an answer broken off (its worker killed, say)
        log.warning("%s answered brokenly: %r", service, exc)
        raise BadGateway.of(service) from None
    finally:
        _call.deadline = None
    if upstream.status_code >= 500 and not _unavailable_for_now(upstream):
        log.error("%s answered %s: %s", service, upstream.status_code, upstream.text[:500])
        raise BadGateway.of(service)
    if upstream.status_code == 401:
        raise BadGateway.identity_refused(service, upstream.text[:500])
    if not _an_answer_of_the_api(upstream):  # (a URL that names something else, say)
        log.error("%s answered %s, %s: %s", service, upstream.status_code,
                  upstream.headers.get("Content-Type"), upstream.text[:500])
        raise BadGateway.of(service)
    response = Response(upstream.content, status=upstream.status_code)
    for name in FORWARDED_RESPONSE_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    return response


def _sent(service: str, safe_to_repeat: bool, method: str, url: str,
          **kwargs) -> requests.Response:
    """The request sent, and its answer; sent once more, on a new connection, when a kept-alive
    connection it went on was closed before a byte of an answer came, if it is `safe_to_repeat`
    (within the same deadline)."""
    try:
        return _http().request(method, url, **kwargs)
    except requests.ConnectionError as exc:
        if not (safe_to_repeat and exc.args and isinstance(exc.args[0], ProtocolError)
                and _call.kept_alive and not _call.answered):
            raise
        # urllib3 has closed that connection, and the thread's pool holds no other (one call at
        # a time), so the next request connects afresh.
        log.info("%s closed a kept-alive connection without answering (%r): sending the request"
                 " again on a new one", service, exc)
    return _http().request(method, url, **kwargs)


def _an_answer_of_the_api(upstream: requests.Response) -> bool:
    """JSON, as every answer of the services' APIs is, and no redirect (none of theirs is one):
    what the gRPC transport would have turned into a reply (or a 502)."""
    media_type = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return media_type == "application/json" and not 300 <= upstream.status_code < 400


def _unavailable_for_now(upstream: requests.Response) -> bool:
    """A 503 the service answered itself, as the usual JSON error: it can say when to retry."""
    if upstream.status_code != 503:
        return False
    try:
        return isinstance(upstream.json()["error"]["code"], str)
    except (ValueError, KeyError, TypeError):
        return False
