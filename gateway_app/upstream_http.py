"""Calling the services over HTTP: one pooled requests session per thread, one deadline for the
whole of each call, and a request that a kept-alive connection was closed on sent once more where
that is safe.

"Too slow" is one deadline for the whole call (UPSTREAM_TIMEOUT_SECONDS, as over gRPC), its
connection, the sending of its request, its answer's headers and its body, each send and each read
waiting only for what is left of it (each send whole over plain HTTP, each piece of one over TLS:
_TellingIfKeptAlive.send): a read timeout alone starts again with each byte, so an answer dripping a
byte a second held the gateway's thread, and its client, for as long as it dripped; and a send
waited the connect timeout, whatever was left. The answer is waited for COMMIT_GRACE_SECONDS past
that deadline, the moment signed to the service, past which it commits nothing: a COMMIT begun
before it is answered as it ended (shared/caller_deadline.py). The connection of a request or an
answer cut off is closed, never pooled.

Connections are kept alive and pooled, and a service closes one idle past its keep-alive (2 s,
gunicorn's default) whenever it likes: just as the gateway sends a request on it, say, and the
request then fails before a byte of an answer comes, though the service has most likely not seen it.
A request that fails so, on a connection that carried one before, is sent once more, on a new
connection, within what is left of the deadline, where that is safe (gateway_app/resends.py: a GET
or HEAD, or a POST with an Idempotency-Key passed on). Any other fails, as does a request closed
without an answer on a connection made for it (the second try's too), or after a byte of one: the
service may have carried it out, or is refusing it. A second try that does nothing (no connection
made) leaves the first try's failure, a 502, as does a keyed POST's that fails (any 5xx: rolled
back for the deadline, the service's 504 CALLER_GAVE_UP, or its 503 IDEMPOTENCY_KEY_IN_USE); a
GET's second try is answered as a first answer would be, its 5xx too (a 503 DATABASE_BUSY with
its Retry-After). The connections are the services' own, never through a proxy the environment
names, and carry no cookie (none is kept).

How soon the failure came does not count (gateway_app/resends.py): a close the service made
before the request came can show late on a slowed host (two busy cores, a pause for the
collector: the failure is seen when the thread next reads, not when the close came), and a safe
GET would be a 502 that a second try answers; one the service read, held and then dropped (its
worker killed) is sent again as well.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import io
import json
import logging
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from gateway_app.resends import SECOND_TRY_NEEDS_SECONDS
from gateway_app.upstream_answers import UNREADABLE_JSON, an_error_of_the_api
from shared.caller_deadline import COMMIT_GRACE_SECONDS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 1.0

_sessions = threading.local()


class _Call(threading.local):
    """The call this thread is making: each thread has a session of its own (below), so the
    connections of its pools carry this thread's calls only."""

    # time.monotonic() by which the request is sent whole (the moment signed to the service), and
    # by which the whole answer is read: COMMIT_GRACE_SECONDS later
    deadline: float | None = None
    answer_deadline: float | None = None
    # its request went on a connection that had carried one before: set before the send, which
    # can fail unseen (urllib3 takes a broken pipe or a reset there for a service that answered
    # early, and reads on)
    kept_alive = False
    answered = False  # a byte of an answer to it came

    def begin(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.answer_deadline = self.deadline + COMMIT_GRACE_SECONDS
        self.kept_alive = self.answered = False

    def end(self) -> None:
        self.deadline = self.answer_deadline = None

    def seconds_left(self) -> float | None:
        """What is left of the deadline to send in (None: no call under way); TimeoutError once
        it has passed."""
        return _left_of(self.deadline)

    def seconds_left_for_the_answer(self) -> float | None:
        """What is left of the deadline and the grace to read the answer in (None: no call under
        way); TimeoutError once they have passed."""
        return _left_of(self.answer_deadline)


def _left_of(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the call's deadline has passed")
    return left


_call = _Call()


class _ReadAgainstTheDeadline(io.RawIOBase):
    """An answer's reads off its connection's socket, each waiting at most for what is left of
    the call's deadline and its grace (TimeoutError once they have passed), where each waited the
    read timeout."""

    def __init__(self, raw: io.RawIOBase, sock):
        super().__init__()
        self._raw, self._sock = raw, sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        left = _call.seconds_left_for_the_answer()
        if left is not None:
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
        # (http.client makes `fp` as sock.makefile("rb") and reads nothing of it in __init__: the
        # versions pinned do; the drip tests fail if that changes.)
        self.fp = io.BufferedReader(_ReadAgainstTheDeadline(self.fp.detach(), sock))


class _NotSentInTime(ReadTimeoutError):
    """The request not sent whole in time (what was left of the deadline, or the connect timeout
    where that was less): the service took too little of it, its buffers full. A read timeout to
    urllib3, which closes the connection, and to requests (its ReadTimeout), as an answer not
    begun in time is: the same 504 (gateway_app/proxy.py). A send timed out was urllib3's
    ProtocolError, a 502, as if the service had closed the connection."""

    def __init__(self, pool, url: str | None, message: str):
        super().__init__(pool, url, message)
        if pool is None:  # (raised by a connection, which knows no pool: not "None: ...")
            self.args = (message,)


class _TellingIfKeptAlive:
    """A connection telling the call whether its request went on a socket that had carried one
    before (kept alive, from the pool) or on one made for it, and sending the request against the
    call's deadline."""

    response_class = _AnswerAgainstTheDeadline
    _carried = 0  # requests sent on its socket

    def connect(self) -> None:
        super().connect()
        self._carried = 0

    def request(self, *args, **kwargs) -> None:
        # (Over HTTP a connection made for the request connects inside super().request.)
        _call.kept_alive = self.sock is not None and self._carried > 0
        _call.answered = False
        try:
            super().request(*args, **kwargs)
        except TimeoutError as exc:  # a send's (urllib3 raises its own for a connect's)
            raise _NotSentInTime(None, None, f"Sending the request to {self.host}:{self.port}"
                                 f" did not end in time ({exc}).") from exc
        self._carried += 1

    def send(self, data) -> None:
        """http.client's send (of the request line and headers, then of the body), waiting at
        most for what is left of the deadline, and no longer than it did: the socket's timeout
        as urllib3 sends with it, the connect timeout. Over plain HTTP, as the services are
        called, that holds for all it sends: a socket's sendall holds to one timeout for all of
        it, not for each piece. Over TLS it holds for each piece only: ssl's sendall sends a
        piece at a time, each waiting the whole timeout afresh, so a send can outlast the
        deadline there."""
        if self.sock is None:
            self.connect()  # (as http.client's own send does, first)
        left = _call.seconds_left()
        if left is not None:
            self.sock.settimeout(left if self.timeout is None else min(left, self.timeout))
        super().send(data)


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


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keeps no cookie and sends none: a session carries the calls of every user its thread
    serves, so a cookie set on the way back from one user's call (a load balancer's sticky
    session, anything in front of a service) went with every later call, other users' too. The
    gRPC transport has no such state; the services' APIs set no cookie of their own."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


def _http() -> requests.Session:
    # One pooled session per thread: requests' Session is not meant to be shared across threads.
    if not hasattr(_sessions, "session"):
        session = requests.Session()
        session.cookies.set_policy(_NoCookies())
        # The services are reached directly, whatever proxy the environment names: through one,
        # requests would make its connections with urllib3's own classes, not those above.
        session.trust_env = False
        for scheme in ("http://", "https://"):
            session.mount(scheme, _Adapter())
        _sessions.session = session
    return _sessions.session


def send(service: str, method: str, url: str, *, deadline_seconds: float, safe_to_repeat: bool,
         under_its_key: bool, **kwargs) -> requests.Response:
    """The request sent to `service` within `deadline_seconds` (the deadline signed to it), and
    its whole answer read within COMMIT_GRACE_SECONDS more (else requests' Timeout, or its
    ConnectionError around urllib3's ReadTimeoutError once the answer has begun); sent once
    more, on a new connection, when a kept-alive connection it went on was closed before a byte
    of an answer came, if it is `safe_to_repeat` (within the same deadline); if it is sent again
    `under_its_key` (a keyed POST: gateway_app/resends.py), the second try's 5xx is the first
    try's failure. `kwargs` go to requests."""
    _call.begin(deadline_seconds)
    try:
        return _sent(service, method, url, safe_to_repeat, under_its_key,
                     timeout=(min(CONNECT_TIMEOUT_SECONDS, deadline_seconds),
                              deadline_seconds + COMMIT_GRACE_SECONDS),
                     **kwargs)
    finally:
        _call.end()


def _sent(service: str, method: str, url: str, safe_to_repeat: bool, under_its_key: bool,
          **kwargs) -> requests.Response:
    try:
        return _http().request(method, url, **kwargs)
    except requests.ConnectionError as exc:
        first_failure = exc
        left = _call.deadline - time.monotonic()
        if not (safe_to_repeat and exc.args and isinstance(exc.args[0], ProtocolError)
                and _call.kept_alive and not _call.answered
                and left > SECOND_TRY_NEEDS_SECONDS):
            raise
        # urllib3 has closed that connection, and the thread's pool holds no other (one call at
        # a time), so the next request connects afresh, within what is left of the deadline.
        log.info("%s closed a kept-alive connection without answering (%r): sending the request"
                 " again on a new one", service, exc)
    try:
        answer = _http().request(method, url, **{
            **kwargs,
            "timeout": (min(CONNECT_TIMEOUT_SECONDS, left), left + COMMIT_GRACE_SECONDS)})
    except requests.ConnectionError as again:
        if again.args and isinstance(again.args[0], (ProtocolError, ReadTimeoutError)):
            raise
        # No new connection (refused, or none in time): the service may have read the first
        # send and died carrying it out, so that first failure is the one to answer for (a 502,
        # "may have been carried out"), not this one's "unavailable", which would deny it.
        raise first_failure from again
    if under_its_key and answer.status_code >= 500:
        # Nor may a keyed POST's 5xx, which vouches for nothing the first did: its rollback for
        # the deadline (the same moment as the first's) or its 503 (IDEMPOTENCY_KEY_IN_USE: held
        # up by the first's uncommitted key; DATABASE_BUSY) says nothing was done by it alone,
        # while the first may be under way still and commit after it, as over gRPC
        # (gateway_app/resends.py). A read's is answered as a first answer would be.
        log.warning("%s answered the request sent again %s %s: the first try's failure is"
                    " answered", service, answer.status_code,
                    error_code_of(answer) or "(no error of the API's)")
        raise first_failure from None
    return answer


def error_code_of(answer: requests.Response) -> str | None:
    """The `error.code` of a service's `answer`, if its body is an error as the APIs answer one,
    {"error": {"code", "message", "details"}}, each of them as the services write it
    (upstream_answers.an_error_of_the_api, the check the gRPC transport makes of a failed call's
    trailers); None if it is none."""
    try:
        error = json.loads(answer.content)["error"]
    except (*UNREADABLE_JSON, KeyError, TypeError):
        return None
    if not (isinstance(error, dict) and an_error_of_the_api(
            error.get("code"), error.get("message"), error.get("details"))):
        return None
    return error["code"]
