"""The request id that follows one user action from the click to the final status: taken from (or
given to) each HTTP request, put on every log line, written into the Kafka headers of the messages
the request causes, and restored while a service handles such a message."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from typing import NamedTuple

from flask import Flask, request

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_KAFKA_HEADER = "request_id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")
# What a logged path (a gRPC method, a request id) cannot hold as it is: a control character (a
# newline decoded from %0A, say; C0, DEL, or C1, U+0080 to U+009F, whose NEL U+0085 some readers
# break lines at) and the Unicode line and paragraph separators (U+2028, U+2029: a line break to a
# reader that splits lines as Python's str.splitlines does, or to a log viewer) are written
# escaped, so a request cannot add a line of its own making to the log.
_ESCAPED_IN_LOGS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    code: f"\\u{code:04x}" for code in (0x2028, 0x2029)}


class _SeveralRequestIds(NamedTuple):
    """The request ids of messages handled together that share none: each id once, and how many of
    the messages came with none."""

    ids: tuple[str, ...]
    without: int

    def logged(self) -> str:
        """As a line's one-word field: the ids, the first IDS_NAMED_AT_MOST named and the others
        counted ("+3-more"), then the messages with none counted ("+2-none")."""
        return ",".join([named_at_most(self.ids, ","),
                         *([f"+{self.without}-none"] if self.without else [])])


# The request id bound, or, while messages of several (or of one and none) are handled together,
# their ids: the log's alone, a message written meanwhile answering no one of those requests.
_current: ContextVar[str | _SeveralRequestIds | None] = ContextVar("hseshop_request_id",
                                                                  default=None)


def current_request_id() -> str | None:
    bound = _current.get()
    return bound if isinstance(bound, str) else None


def sane_request_id(candidate: str | None) -> str:
    """The caller's id when it is sane, else a new one."""
    return given_request_id_if_sane(candidate) or uuid.uuid4().hex


def given_request_id_if_sane(candidate: str | None) -> str | None:
    """The caller's id when it is sane, else None."""
    return candidate if candidate and SANE_REQUEST_ID.fullmatch(candidate) else None


def escaped_in_logs(text: str) -> str:
    """`text` as a log line may hold it, what a client wrote: its control characters escaped."""
    return text.translate(_ESCAPED_IN_LOGS)


def request_id_bound(request_id: str | None) -> AbstractContextManager[None]:
    return _bound(request_id)


def request_ids_bound(request_ids: Iterable[str | None]) -> AbstractContextManager[None]:
    """Bind the request ids of messages handled together (a run of a batch given to its handler
    at once, a batch that failed): one they all share as request_id_bound does; several for the
    log alone, each once, comma-separated (a sane id holds no comma), the first IDS_NAMED_AT_MOST
    named and the others counted, then how many messages came with none ("+2-none": a run of
    one id's messages and others without one is not logged as if they all shared it),
    current_request_id() giving none of them."""
    given = [request_id or None for request_id in request_ids]
    distinct = list(dict.fromkeys(given))
    if len(distinct) == 1:
        return _bound(distinct[0])
    return _bound(_SeveralRequestIds(tuple(filter(None, distinct)), given.count(None)))


@contextmanager
def _bound(bound: str | _SeveralRequestIds | None) -> Iterator[None]:
    token = _current.set(bound)
    try:
        yield
    finally:
        _current.reset(token)


def bind_request_id(request_id: str | None) -> Token:
    """Bind `request_id` until unbind_request_id is given the token: for a span no `with` holds
    (an HTTP request's, a Celery task's run with the lines Celery writes once its body is done)."""
    return _current.set(request_id)


def unbind_request_id(token: Token) -> None:
    _current.reset(token)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s] %(message)s"

# The most request ids a line of several messages names; the others it counts ("+5-more": no
# space, the field one word; no sane id begins with "+"), so a line of a large batch stays short.
IDS_NAMED_AT_MOST = 10


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to every log record, so formats can show it: escaped as a logged path is
    (an id is checked where it comes in; one that was not, an inbox row stored before the check,
    say, still cannot break the line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _current.get()
        if isinstance(bound, _SeveralRequestIds):
            bound = bound.logged()
        record.request_id = escaped_in_logs(bound or "-")
        return True


def named_at_most(names: Sequence[str], separator: str) -> str:
    """The first IDS_NAMED_AT_MOST of `names`, and how many others there are ("+3-more")."""
    more = len(names) - IDS_NAMED_AT_MOST
    return separator.join([*names[:IDS_NAMED_AT_MOST], *([f"+{more}-more"] if more > 0 else [])])


def log_with_request_ids(handler: logging.Handler) -> None:
    """Make `handler` write each record with the request id it belongs to."""
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))


def configure_logging() -> None:
    """INFO and up to stderr with request ids, unless the process (Celery, say) set logging up."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    log_with_request_ids(handler)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# What the request's log line says it was answered, where the response Flask holds is not what was
# sent: a WebSocket's route sets it (flask-sock's response, status 200, is never sent once the
# handshake has been answered 101).
LOGGED_OUTCOME = "hseshop.logged_outcome"


def install_request_ids(app: Flask) -> None:
    """Bind each request's id for its duration, echo it back, and log one line per request."""
    log = logging.getLogger(f"hseshop.{app.name}.http")

    @app.before_request
    def _bind_request_id():
        request.environ["hseshop.request_id_token"] = bind_request_id(
            sane_request_id(request.headers.get(REQUEST_ID_HEADER)))

    @app.after_request
    def _echo_request_id(response):
        request_id = current_request_id()
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        log.info("%s %s -> %s", request.method, escaped_in_logs(request.path),
                 request.environ.get(LOGGED_OUTCOME, response.status_code))
        return response

    @app.teardown_request
    def _unbind_request_id(_exc):
        token = request.environ.pop("hseshop.request_id_token", None)
        if token is not None:
            unbind_request_id(token)
