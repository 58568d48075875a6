"""The gunicorn worker the shop's HTTP servers run: gunicorn's threaded worker, answering a request
it cannot read with the shop's JSON error instead of an HTML page.

gunicorn answers some requests itself, before any app sees them (gunicorn/workers/base.py:
`Worker.handle_error`): a request line longer than `limit_request_line` (4094 bytes) with 414, more
than `limit_request_fields` header fields (100) or a header line longer than
`limit_request_field_size` (8190 bytes, its line end counted) with 431, a malformed request line or
header with 400, an `Expect` other than `100-continue` with 417, a `Transfer-Encoding` it does not
know with 501, and an app that raised past Flask with 500. gunicorn writes that answer with
`gunicorn.util.write_error`, which it has no setting or hook for, so this worker class
(`-k shared.gunicorn_worker.JsonErrorsThreadWorker`) replaces that function with
`write_json_error` as its process starts, as it does the other pieces of gunicorn's below
(GUNICORN_REPLACED).

It also makes the answer to a request whose body could not be read (a malformed chunk, which the
app answers 400) say `Connection: close`: gunicorn closes the connection after it then (where the
next request starts is unknown), but its answer said keep-alive, and it drops a Connection header
the app sets.

It sends a request's `100 Continue` (to `Expect: 100-continue`) as the app first reads the body,
not as gunicorn hands the request to the app (gunicorn/http/wsgi.py: `create`): an app that
answers without reading the body (a 413 for a Content-Length over the limit, a 401) answers in
place of the 100, and the client is spared sending a body that nobody reads. Such an answer says
`Connection: close`, and the connection is closed after it: the client may send the body or not,
so where its next request would start is unknown. An answer begun before the body is read (a
streamed one, whose generator reads it later) is the same: the 100 is never sent (it would land
within the answer), and a read then fails. A request with no body to ask for (a Content-Length
of 0, a GET) is sent no 100, and keeps its connection.

It bounds how long a request's client may take to send it, as nginx's client_header_timeout and
client_body_timeout do (TimedSocketUnreader): each read of a request's head or body waits at most
REQUEST_READ_TIMEOUT_SECONDS, and the whole head REQUEST_HEAD_TIMEOUT_SECONDS. gunicorn's
gthread waits off-thread only for a connection's first bytes (and a kept-alive one's next
request's); after them a thread read the rest with no timeout, so that a client sending its head a
byte at a time, less body than its Content-Length said, or chunks that never end held one of the
server's threads (a service's worker has 4) for as long as it liked. A head that stops arriving is
answered 408 (write_json_error) with `Connection: close`, or, with nothing of the request received
(the connection readable with no request in it: a TLS record, say), closed unanswered; a body that
stops arriving fails the app's read (RequestReadTimedOut, Werkzeug's 408, which the apps answer as
any HTTP error), and the connection is closed after the answer. Once the answer has begun, no 408
can be given: a read of the body that times out then (a streamed answer's, gunicorn's drain of a
body left unread, which has a deadline of its own) fails as gunicorn's own reads do, with a
TimeoutError. The timeout is the socket's only within a read of a request's head or body, never
left on it: the answer's writes, a streamed answer's included, and a WebSocket's reads of its page
(the gateway's notification sockets, quiet for minutes, read the socket itself once upgraded)
never time out.

It closes a connection kept no more (its answer said `Connection: close`, or its request could not
be read) as gunicorn does, its write side first, then what the client still sends read and dropped
for up to 2 s (RFC 9112 9.6), but with those reads waited on in the worker's poller, not on its
main thread, which meanwhile accepted nothing: a few clients that went on sending after their
answer held the whole worker up, 2 s each in turn. Such a close is one of the worker's connections
until it ends: worker_connections caps it, and a worker that stops waits for it.

And it names no server software: gunicorn writes `Server: gunicorn` into each answer (not the
version; it has no setting for it), which only tells a prober what to try, and gives each request's
WSGI environ a SERVER_SOFTWARE of `gunicorn/<version>`, which an app's page or log could pass on
with the version. The answers go without the header, and the environ's SERVER_SOFTWARE is empty
(NO_SERVER_SOFTWARE): the key is there, for an app that reads it, naming nothing. gunicorn's
arbiter also puts `gunicorn/<version>` in the master's process environment as SERVER_SOFTWARE
(gunicorn/arbiter.py: `Arbiter.__init__`), which each worker inherits, and each subprocess an app
starts: the worker takes it out of its own as it starts.

As it stops taking requests, told to (SIGTERM, or SIGINT and SIGQUIT, gunicorn's quick shutdown)
or by itself (max_requests served, its parent gone, --reload seeing a file changed), it tells the
requests that last to end (shared.process_stopping): the gateway's notification sockets are closed
with 1012 (service restart), the page reconnecting at once, where gunicorn waited for them to its
graceful_timeout (30 s; 2 s for a quick shutdown asked for after SIGTERM), then dropped them
unclosed.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import sys
import time
from collections import deque
from functools import partial

from gunicorn import util
from gunicorn.arbiter import Arbiter
from gunicorn.http import parser, wsgi
from gunicorn.http.body import LengthReader
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import RequestTimeout
from werkzeug.http import HTTP_STATUS_CODES

from shared.config import get_settings, load_settings
from shared.errors import INTERNAL_ERROR, code_for, error_body
from shared.process_stopping import stop_requests_that_last


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn calls `util.write_error`, with its arguments: the answer to a request it could
    not read, as `{"error": {"code", "message", "details"}}` and, like gunicorn's, its last."""
    # The status's name as the apps' own errors give it (werkzeug's, whatever Python's http module
    # calls it), for the status line and the code alike: gunicorn's own can be another status's
    # ("Bad Request" with its 501 for an unsupported Transfer-Encoding).
    reason = HTTP_STATUS_CODES.get(status_int, reason)
    if status_int == 500:
        body = error_body(*INTERNAL_ERROR)
    else:
        body = error_body(code_for(reason), mesg or reason)
    payload = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + payload)


class RequestReadTimedOut(RequestTimeout):
    """A request's head or body that stopped arriving before its answer began: a 408. Werkzeug's
    own 408, so that an app reading the body answers it as any HTTP error (the shop's apps in
    their JSON shape); not an OSError, which Werkzeug's reader of a body would take for the client
    gone and make a 400 of. `anything_received`: whether any of the request had come (a head's
    timeout with nothing received is answered by closing the connection)."""

    def __init__(self, description: str, anything_received: bool = True):
        super().__init__(description)
        self.anything_received = anything_received


class TimedSocketUnreader(SocketUnreader):
    """gunicorn's reader of a connection's socket (what its HTTP/1 parser reads a request's head
    and body through), each read of it given a timeout while a request's head or body is read
    (RequestDeferringContinue says which): REQUEST_READ_TIMEOUT_SECONDS, and for the head what is
    left of REQUEST_HEAD_TIMEOUT_SECONDS, counted from its first read. The socket has the timeout
    for that read alone: whatever else uses it (the answer's writes, a WebSocket) finds it as it
    was."""

    HEAD, BODY, ANSWERING = "head", "body", "answering"

    def __init__(self, sock, max_chunk=8192):
        super().__init__(sock, max_chunk)
        settings = get_settings()
        self.read_timeout = settings.request_read_timeout_seconds
        self.head_timeout = settings.request_head_timeout_seconds
        self.reading = None  # what is being read: HEAD, BODY, or ANSWERING (a body, answered)
        self.head_deadline = 0.0
        self.head_received = 0

    def head_begins(self) -> None:
        self.reading = self.HEAD
        self.head_deadline = time.monotonic() + self.head_timeout
        # (a pipelined request may have come, whole or in part, with the one before it)
        self.head_received = len(self.buf.getvalue())

    def body_begins(self) -> None:
        self.reading = self.BODY

    def answer_begins(self) -> None:
        self.reading = self.ANSWERING

    def chunk(self, size_hint=None):
        if self.reading is None:
            return super().chunk(size_hint)
        wait = self.read_timeout
        if self.reading is self.HEAD:
            wait = min(wait, self.head_deadline - time.monotonic())
            if wait <= 0:
                raise self._timed_out()
        before = self.sock.gettimeout()
        if before is not None and before <= wait:
            # A caller's own, shorter timeout (gunicorn's drain of a body left unread): its
            # TimeoutError is the caller's to take.
            return super().chunk(size_hint)
        self.sock.settimeout(wait)
        try:
            data = super().chunk(size_hint)
        except TimeoutError:
            if self.reading is self.ANSWERING:
                raise  # (no 408 can be given: the answer has begun)
            raise self._timed_out() from None
        finally:
            self.sock.settimeout(before)
        if self.reading is self.HEAD:
            self.head_received += len(data)
        return data

    def _timed_out(self) -> RequestReadTimedOut:
        if self.reading is self.HEAD:
            return RequestReadTimedOut(
                f"The request's head did not arrive in time (within {self.head_timeout:g} s, and"
                f" {self.read_timeout:g} s at most between its parts).",
                anything_received=self.head_received > 0)
        return RequestReadTimedOut(
            f"The request body stopped arriving: nothing of it came for {self.read_timeout:g} s.")


class BodyNotAskedFor(Exception):
    """A request body read once its answer has begun with the body never asked for: its
    `100 Continue`, owed by the first read, would have landed within the answer."""


class ContinuedOnFirstRead:
    """A request body's reader (gunicorn's Body reads through one) that sends `100 Continue` before
    it first reads, unless the answer began first."""

    CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, reader, sock):
        self.reader = reader
        self.sock = sock
        self.continue_owed = True
        self.answered_unasked = False

    def read(self, size: int) -> bytes:
        if self.answered_unasked:
            raise BodyNotAskedFor("the answer began before the request body was asked for")
        if self.continue_owed:
            self.continue_owed = False
            util.write(self.sock, self.CONTINUE)
        return self.reader.read(size)

    def stop_owing(self) -> None:
        """The answer begins with the 100 still owed: it is never sent, and a read fails."""
        self.continue_owed = False
        self.answered_unasked = True


class RequestDeferringContinue(Request):
    """gunicorn's HTTP/1 request, but that its `100 Continue` waits for the app to read the body,
    and that it asks for its connection to be closed once reading its body raised (gunicorn's Body
    marks itself `failed`; what gunicorn does after the answer then anyway, Parser.finish_body,
    and now also what the answer's Connection header says) or while the 100 is still owed (the
    app answered without reading the body, which the client may or may not send). It tells its
    connection's reader (TimedSocketUnreader) when its head, its body and its answer begin."""

    def parse(self, unreader):
        timed = isinstance(unreader, TimedSocketUnreader)
        if timed:
            unreader.head_begins()
        unused = super().parse(unreader)
        if timed:
            unreader.body_begins()
        return unused

    def set_body_reader(self) -> None:
        super().set_body_reader()
        if self._expected_100_continue:
            # No longer sent by gunicorn's wsgi.create before the app runs: owed from now on by the
            # body's first read, if there is a body to ask for. With none (a Content-Length of 0,
            # a GET with neither length nor chunks) no 100 is sent (RFC 9110 10.1.1 lets a server
            # leave it out when the framing says there is no content), and no unread body makes
            # the connection's next request start at an unknown place.
            self._expected_100_continue = False
            reader = self.body.reader
            if not isinstance(reader, LengthReader) or reader.length > 0:
                self.body.reader = ContinuedOnFirstRead(reader, self.unreader.sock)

    def answer_begins(self) -> None:
        """Its answer's headers are being written. A 100 still owed is then never sent (a late
        read, a streamed answer's, would put it within the answer: it fails instead), and the
        connection is closed after the answer, whatever a late read did: the client may send the
        body or not. A read of the body that times out from now on is no 408."""
        if isinstance(self.unreader, TimedSocketUnreader):
            self.unreader.answer_begins()
        reader = self.body.reader
        if isinstance(reader, ContinuedOnFirstRead) and reader.continue_owed:
            reader.stop_owing()
            self.force_close()

    def should_close(self) -> bool:
        return (getattr(self.body, "failed", False)
                or getattr(getattr(self.body, "reader", None), "continue_owed", False)
                or super().should_close())


# What each request's environ says its server software is (gunicorn's wsgi.base_environ: its own
# `gunicorn/<version>`): nothing, as the answers name no server either.
NO_SERVER_SOFTWARE = ""


class ResponseNamingNoServer(wsgi.Response):
    """gunicorn's HTTP/1 answer, without the `Server` header it always writes, and that tells its
    request as it writes its headers (its Connection header decided then) that the answer begins."""

    def send_headers(self) -> None:
        if not self.headers_sent and isinstance(self.req, RequestDeferringContinue):
            self.req.answer_begins()
        super().send_headers()

    def default_headers(self) -> list[str]:
        return [line for line in super().default_headers() if not line.startswith("Server:")]


# What the worker puts in gunicorn's place as its process starts (JsonErrorsThreadWorker.
# init_process), each as (owner, name, replacement): the function gunicorn writes the answers it
# gives itself with, the class its HTTP/1 parser reads a connection's socket through, the class it
# makes each request of, the name wsgi.create builds each HTTP/1 answer from, and the server
# software wsgi.base_environ writes into each request's environ. gunicorn has no setting nor hook
# for any of them.
GUNICORN_REPLACED = (
    (util, "write_error", write_json_error),
    (parser, "SocketUnreader", TimedSocketUnreader),
    (RequestParser, "mesg_class", RequestDeferringContinue),
    (wsgi, "Response", ResponseNamingNoServer),
    (wsgi, "SERVER_SOFTWARE", NO_SERVER_SOFTWARE),
)


def _exit_on_a_setting_refused(log, app: str | None, read=get_settings) -> None:
    """Exit as a worker that failed to boot (gunicorn stops on it, where it would start another
    worker again and again on any other exit) if the shop's settings, as `read` reads them, refuse
    a value, said in a line naming `app`, its password hidden."""
    try:
        read()
    except ValueError as exc:
        log.error("%s: nothing served: %s", app or "the app", exc)
        sys.exit(Arbiter.WORKER_BOOT_ERROR)


class JsonErrorsThreadWorker(ThreadWorker):
    """gunicorn's threaded worker (what `--threads` above 1 picks), that makes the answers gunicorn
    writes itself JSON, defers `100 Continue` to the body's first read, times out a request's
    head or body that stops arriving, lingers over a closed connection in its poller, names no
    server software (no `Server` header, an empty SERVER_SOFTWARE in each request's environ, none
    in the worker's process environment), and, stopping, tells the requests that last to end."""

    quitting = False  # handle_quit under way

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The closed connections whose reads linger (_linger), by when they end, oldest first,
        # and what each has read so far.
        self.lingering: deque[tuple[float, socket.socket]] = deque()
        self.lingering_drained: dict[socket.socket, int] = {}

    def init_process(self):
        # In the worker's process, once forked, before super's loads the app and runs the loop that
        # parses each request: every request gunicorn reads, and every answer it gives itself
        # (Worker.handle_error), is the worker's. The arbiter reads no request nor answers one.
        for owner, name, replacement in GUNICORN_REPLACED:
            setattr(owner, name, replacement)
        # The arbiter's `gunicorn/<version>`, inherited from the master's environment: gone from
        # the worker's, and so from that of every subprocess the app starts.
        os.environ.pop("SERVER_SOFTWARE", None)
        super().init_process()

    @classmethod
    def check_config(cls, cfg, log):
        # A setting the app cannot take, said in a line (its password hidden), as the operator's
        # commands say it, where the app's factory raised it in gunicorn's traceback: by the
        # arbiter, as it checks the worker class before it starts any worker, and it exits as one
        # whose worker failed to boot (3). Said by each worker instead (load_wsgi, kept for a
        # setting changed before a reload), two workers failing together had the arbiter's stop
        # raise HaltServer within its own halt, a traceback and exit 1 (gunicorn 27). The line
        # names the app as gunicorn was given it (its argument, or `wsgi_app` in a config file),
        # not the process's name, which --name replaces.
        # The master reads them uncached (load_settings), so that each worker reads its own
        # environment (get_settings), as after a HUP. With --preload (which no setting here uses)
        # the master makes the app before this: the factory's error comes in its traceback.
        super().check_config(cfg, log)
        _exit_on_a_setting_refused(log, cfg.wsgi_app or cfg.default_proc_name, load_settings)

    def load_wsgi(self):
        _exit_on_a_setting_refused(self.log,
                                   getattr(self.app, "app_uri", None) or self.cfg.wsgi_app)
        super().load_wsgi()

    def handle_error(self, req, client, addr, exc):
        if not isinstance(exc, RequestReadTimedOut):
            super().handle_error(req, client, addr, exc)
            return
        # A head that stopped arriving (a body's is the app's to answer, unless it let the error
        # past, as an app other than the shop's may): a client's fault, logged as gunicorn logs
        # one it could not read, but at INFO (a phone that lost its signal).
        self.log.info("Request timed out from ip=%s: %s", (addr or ("",))[0], exc.description)
        if exc.anything_received:
            try:
                write_json_error(client, exc.code, exc.name, exc.description)
            except Exception:
                self.log.debug("Failed to send error message.")

    def handle_exit(self, sig, frame):
        # SIGTERM (a deploy, a restart, the arbiter's reload): gunicorn stops taking connections
        # and waits up to its graceful_timeout for those open; the requests that last (the
        # gateway's notification sockets) are told to end, so that it need not wait them out.
        stop_requests_that_last()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        # SIGINT or SIGQUIT (Ctrl-C in the terminal reaches the master and its workers alike; the
        # arbiter's quick shutdown sends the workers SIGQUIT): gunicorn leaves the requests in
        # flight to their threads and exits the worker's main thread (sys.exit). The process
        # ends once they have: a socket that was never told ran on, unheard, until the arbiter
        # killed the worker (30 s: graceful_timeout, 2 s after SIGTERM) and dropped it unclosed.
        # Told to end, each closes as on SIGTERM, with 1012, within a turn of its loop.
        #
        # Once only: a second such signal runs this handler again inside the first, wherever the
        # first has got to (Ctrl-C's SIGINT reaches the worker, then the arbiter's SIGQUIT comes
        # on its heels), and gunicorn's shuts its thread pool down (ThreadPoolExecutor.shutdown),
        # under a lock that is not reentrant: the second, taking it again inside the first, waited
        # on itself for good, and the arbiter killed the worker 30 s on (graceful_timeout). The
        # first goes on to exit the worker all the same.
        if self.quitting:
            return
        self.quitting = True
        stop_requests_that_last()
        super().handle_quit(sig, frame)

    def _cap_keepalive(self, deadline):
        # gthread's run() calls this once, as its loop of taking requests ends, however it ended:
        # SIGTERM, but also max_requests served, the parent gone, or --reload seeing a file
        # changed, which end the loop with no signal; and before it waits for the connections
        # open, up to graceful_timeout. The requests that last are told to end here too.
        stop_requests_that_last()
        super()._cap_keepalive(deadline)

    def finish_request(self, conn, fs):
        # A connection the request closed itself (a WebSocket's: simple_websocket's reader closes
        # it as it ends) is counted off once. gunicorn's own close of it fails on the closed
        # socket, and its error path counted the connection off a second time, so that the count
        # drifted below what is open and `worker_connections` stopped capping it.
        if conn.sock.fileno() == -1:
            self.nr_conns -= 1
            return
        if not fs.cancelled() and fs.exception() is None and not fs.result():
            # A connection kept no more (its answer said close, or its request could not be read):
            # still counted while its close lingers (_end_lingering counts it off), so that
            # worker_connections caps the lingering sockets too, and a stopping worker's wait for
            # its connections (gthread's run: while nr_conns > 0, up to graceful_timeout) waits
            # their closes out, where it exited with them open and its kernel reset those holding
            # what their clients still sent.
            self._linger(conn.sock)
            return
        super().finish_request(conn, fs)

    # How long a closed connection's reads linger, and how much of what its client still sends
    # they read, at most (gunicorn's util.close_graceful's).
    LINGER_SECONDS = 2.0
    LINGER_MAX_BYTES = 64 * 1024

    def _linger(self, sock) -> None:
        """Close `sock` as gunicorn does (RFC 9112 9.6: its write side first, then what the client
        still sends read and dropped until it closes its own, so that its kernel's reset cannot
        cut the answer short), but waiting on its reads in the worker's poller. gunicorn waited
        on them on the worker's main thread (util.close_graceful, up to 2 s), which meanwhile
        accepted no connection and passed no kept-alive one on: a few clients that went on
        sending after their answer (a 408's, say) held the whole worker up, 2 s each in turn."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._linger_read, sock))
        except (OSError, ValueError, KeyError):
            self.nr_conns -= 1
            util.close(sock)
            return
        self.lingering_drained[sock] = 0
        self.lingering.append((time.monotonic() + self.LINGER_SECONDS, sock))

    def _linger_read(self, sock, _readable) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        drained = self.lingering_drained[sock] + len(data)
        if not data or drained >= self.LINGER_MAX_BYTES:
            self._end_lingering(sock)
        else:
            self.lingering_drained[sock] = drained

    def _end_lingering(self, sock) -> None:
        del self.lingering_drained[sock]
        self.nr_conns -= 1
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.poller.unregister(sock)
        util.close(sock)

    def murder_pending(self):
        # (run() calls it at each turn of its loops, taking requests and stopping alike)
        super().murder_pending()
        now = time.monotonic()
        while self.lingering and self.lingering[0][0] <= now:
            _, sock = self.lingering.popleft()
            if sock in self.lingering_drained:  # (not ended already, by its client's close)
                self._end_lingering(sock)
