"""shared/gunicorn_worker.py: the answers gunicorn writes itself, as `write_json_error` writes them
to a socket given the arguments gunicorn passes (gunicorn/workers/base.py: Worker.handle_error);
the requests and answers of the worker's gunicorn, made of a socket; and its worker class's
process start and its checks of the settings. tests/e2e/test_unreadable_requests.py sends such
requests to the running shop."""

from __future__ import annotations

import contextlib
import json
import selectors
import signal
import socket
import threading
import time
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import gunicorn.util
import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.errors import ParseException
from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import ThreadWorker

from shared import process_stopping
from shared.config import get_settings
from shared.errors import INTERNAL_ERROR
from shared.gunicorn_worker import (
    GUNICORN_REPLACED,
    BodyNotAskedFor,
    JsonErrorsThreadWorker,
    RequestReadTimedOut,
    write_json_error,
)
from tests.network_tools import http_answer_read_off


@pytest.fixture
def gunicorn_as_the_worker_runs_it(monkeypatch):
    """gunicorn's pieces the worker replaces as its process starts, replaced (until the test
    ends)."""
    for owner, name, replacement in GUNICORN_REPLACED:
        monkeypatch.setattr(owner, name, replacement)


def written(status: int, reason: str, mesg: str) -> tuple[str, dict[str, str], bytes]:
    """What `write_json_error` sends: its status line, its headers, its body."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_json_error(ours, status, reason, mesg)
        ours.shutdown(socket.SHUT_WR)
        return http_answer_read_off(theirs)


@pytest.mark.parametrize("status, reason, mesg, status_line, code", [
    (414, "URI Too Long", "Request Line is too large (5014 > 4094)",
     "HTTP/1.1 414 Request URI Too Long", "REQUEST_URI_TOO_LONG"),
    (431, "Request Header Fields Too Large", "Error parsing headers: 'too many fields'",
     "HTTP/1.1 431 Request Header Fields Too Large", "REQUEST_HEADER_FIELDS_TOO_LARGE"),
    # gunicorn names its 501 (an unsupported Transfer-Encoding) "Bad Request".
    (501, "Bad Request", "Unsupported transfer coding: 'gzip'",
     "HTTP/1.1 501 Not Implemented", "NOT_IMPLEMENTED"),
    (400, "Bad Request", "Invalid HTTP Header name: 'Bad Héader'",
     "HTTP/1.1 400 Bad Request", "BAD_REQUEST"),
])
def test_a_request_gunicorn_cannot_read_is_answered_in_the_shops_error_shape(
        status, reason, mesg, status_line, code):
    line, headers, body = written(status, reason, mesg)
    assert line == status_line
    assert headers == {"Connection": "close", "Content-Type": "application/json",
                       "Content-Length": str(len(body))}
    assert json.loads(body) == {"error": {"code": code, "message": mesg, "details": {}}}


def test_an_app_that_failed_past_flask_answers_as_any_unexpected_error():
    line, _, body = written(500, "Internal Server Error", "")
    assert line == "HTTP/1.1 500 Internal Server Error"
    code, message = INTERNAL_ERROR
    assert json.loads(body) == {"error": {"code": code, "message": message, "details": {}}}


def test_the_workers_process_start_replaces_gunicorns_pieces_before_gunicorns_own_start(
        monkeypatch):
    """Not as the module is imported (nothing happens at import time), but in each worker process
    before gunicorn's own init_process loads the app and runs the loop that parses requests;
    gunicorn's error page (util.write_error) among them."""
    assert not any(getattr(owner, name) is replacement
                   for owner, name, replacement in GUNICORN_REPLACED)
    for owner, name, _ in GUNICORN_REPLACED:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # (gunicorn's own again after)
    replaced_as_gunicorns_start_ran = []
    monkeypatch.setattr(ThreadWorker, "init_process", lambda worker: (
        replaced_as_gunicorns_start_ran.extend(getattr(owner, name) is replacement
                                               for owner, name, replacement in GUNICORN_REPLACED)))
    JsonErrorsThreadWorker.__new__(JsonErrorsThreadWorker).init_process()
    assert replaced_as_gunicorns_start_ran == [True] * len(GUNICORN_REPLACED)
    assert (gunicorn.util, "write_error", write_json_error) in GUNICORN_REPLACED


@pytest.mark.parametrize("chunks, closed", [(b"zz\r\n", True),
                                            (b"3\r\nabcdef\r\n0\r\n\r\n", True),
                                            (b"3\r\nabc\r\n0\r\n\r\n", False)])
def test_a_request_whose_body_could_not_be_read_asks_for_its_connection_closed(
        gunicorn_as_the_worker_runs_it, chunks, closed):
    """So that the answer says `Connection: close`, as gunicorn then closes it anyway."""
    head = b"GET /health HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    request = next(RequestParser(Config(), [head + chunks], ("127.0.0.1", 1)))
    assert not request.should_close()
    with contextlib.suppress(ParseException):  # (the malformed chunks')
        request.body.read()
    assert request.should_close() is closed


def test_a_100_continue_is_sent_as_the_body_is_first_read_and_owed_it_closes_the_connection(
        gunicorn_as_the_worker_runs_it):
    """Not before the app runs (gunicorn's wsgi.create): an app answering without reading the body
    answers in place of the 100, and the connection, whose client may send the body or not, is
    closed after it."""
    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n"
                       b"Expect: 100-continue\r\n\r\n")
        request = next(RequestParser(Config(), ours, ("127.0.0.1", 1)))
        client.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing sent yet
            client.recv(100)
        assert request.should_close()
        client.sendall(b"{}")
        assert request.body.read() == b"{}"
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert not request.should_close()


def test_an_answer_begun_with_the_100_owed_never_sends_it_and_closes_the_connection(
        gunicorn_as_the_worker_runs_it):
    """A streamed answer whose generator reads the body after the headers went out: its read sent
    the 100 into the middle of the answer (its chunks), and the connection, though the answer had
    said `Connection: close`, was kept alive. The read now fails, and the connection is closed."""
    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n"
                       b"Expect: 100-continue\r\n\r\n")
        request = next(RequestParser(Config(), ours, ("127.0.0.1", 1)))
        answer = wsgi.Response(request, ours, Config())
        answer.start_response("200 OK", [("Content-Type", "text/plain")])
        answer.write(b"streamed")
        client.sendall(b"{}")  # (a client that sent the body unasked)
        with pytest.raises(BodyNotAskedFor):
            request.body.read()
        answer.close()
        assert answer.should_close()
        ours.shutdown(socket.SHUT_WR)
        status_line, headers, body = http_answer_read_off(client)
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["Connection"] == "close" and headers["Transfer-Encoding"] == "chunked"
    assert body == b"8\r\nstreamed\r\n0\r\n\r\n"


@pytest.mark.parametrize("head", [
    b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 0\r\n",
    b"GET /health HTTP/1.1\r\nHost: shop.test\r\n",
    b"HEAD /health HTTP/1.1\r\nHost: shop.test\r\n",
], ids=["a Content-Length of 0", "a GET", "a HEAD"])
def test_a_request_with_no_body_to_ask_for_is_sent_no_100_and_keeps_its_connection(
        gunicorn_as_the_worker_runs_it, head):
    """A 100 owed for a body that cannot come closed the connection of an answer given without
    reading it."""
    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(head + b"Expect: 100-continue\r\n\r\n")
        request = next(RequestParser(Config(), ours, ("127.0.0.1", 1)))
        wsgi.create(request, ours, ("127.0.0.1", 1), ("127.0.0.1", 8000), Config())
        assert not request.should_close()
        assert request.body.read() == b""
        client.setblocking(False)
        with pytest.raises(BlockingIOError):  # no 100, then or as the body was read
            client.recv(100)


def test_a_read_of_a_request_leaves_its_socket_without_a_timeout(gunicorn_as_the_worker_runs_it):
    """The read timeout is the socket's within a read alone: the answer's writes (to a client that
    reads slowly) and a WebSocket's reads after the upgrade (a page quiet for minutes) find the
    socket blocking, as gunicorn's thread left it."""
    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\n{}")
        parser = RequestParser(Config(), ours, ("127.0.0.1", 1))
        request = next(parser)
        assert ours.gettimeout() is None
        assert request.body.read() == b"{}"
        assert ours.gettimeout() is None
        client.sendall(b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\n{")
        request = next(parser)
        request.unreader.read_timeout = 0.05
        with pytest.raises(RequestReadTimedOut) as timed_out:  # (the rest never sent)
            request.body.read()
        assert ours.gettimeout() is None
        assert timed_out.value.code == 408 and "0.05 s" in timed_out.value.description
        assert request.should_close()


def test_a_body_read_timing_out_once_the_answer_has_begun_is_no_408(gunicorn_as_the_worker_runs_it):
    """No 408 can be given then: the read fails as gunicorn's own reads fail, a TimeoutError, and
    gunicorn's drain of a body left unread gives up on it (the connection is then closed)."""
    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(b"POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\n{")
        parser = RequestParser(Config(), ours, ("127.0.0.1", 1))
        request = next(parser)
        request.unreader.read_timeout = 0.05
        answer = wsgi.Response(request, ours, Config())
        answer.start_response("200 OK", [("Content-Type", "text/plain")])
        answer.write(b"answered")
        with pytest.raises(TimeoutError):
            request.body.read()
        assert not parser.finish_body(deadline=time.monotonic() + 5)
        assert ours.gettimeout() is None


def _a_worker_and_a_connection_kept_no_more(socket_):
    """A worker (only what its closing of connections uses), `socket_`'s connection, and the
    result of a request on it that asked for no keep-alive: for the worker's finish_request."""
    from concurrent.futures import Future

    from gunicorn.workers.gthread import TConn

    worker = JsonErrorsThreadWorker.__new__(JsonErrorsThreadWorker)
    worker.nr_conns, worker.alive = 1, True
    worker.poller = selectors.DefaultSelector()
    worker.pending_conns, worker.lingering, worker.lingering_drained = deque(), deque(), {}
    done = Future()
    done.set_result(False)
    return worker, TConn(None, socket_, None, None), done


@pytest.mark.parametrize("closed_by_the_request", [True, False])
def test_a_connection_is_counted_off_once_however_it_was_closed(closed_by_the_request):
    """A WebSocket's connection is closed by its reader thread before the request ends; gunicorn's
    own close then failed on it, and its error path counted the connection off again."""
    ours, peer = socket.socketpair()
    worker, conn, done = _a_worker_and_a_connection_kept_no_more(ours)
    if closed_by_the_request:
        ours.close()
    peer.close()  # (a close lingers for the peer's end)
    worker.finish_request(conn, done)
    if not closed_by_the_request:
        worker.wait_for_and_dispatch_events(timeout=5)  # (the peer's end, read)
    assert worker.nr_conns == 0
    assert ours.fileno() == -1 and not worker.lingering_drained


def test_a_lingering_close_is_counted_until_it_ends():
    """A stopping worker waits for its connections while nr_conns is above 0 (gthread's run), and
    worker_connections caps nr_conns: a lingering close counted off before it ended let the worker
    exit with it open (its kernel then reset a client still sending, where the close would have
    read what it sent), and let lingering sockets pile up past the cap."""
    ours, peer = socket.socketpair()
    with peer:
        worker, conn, done = _a_worker_and_a_connection_kept_no_more(ours)
        worker.finish_request(conn, done)
        assert ours.fileno() != -1 and worker.nr_conns == 1  # (lingering)
        peer.sendall(b"what the client still sends")
        worker.wait_for_and_dispatch_events(timeout=5)
        assert ours.fileno() != -1 and worker.nr_conns == 1  # (read, and lingering on)
        peer.shutdown(socket.SHUT_WR)  # (the client's end)
        worker.wait_for_and_dispatch_events(timeout=5)
        assert ours.fileno() == -1 and worker.nr_conns == 0


def test_a_close_that_cannot_linger_is_counted_off_as_it_is_closed():
    """A socket the poller cannot take (its client's end reset it, say) is closed at once."""
    ours, peer = socket.socketpair()
    with peer:
        worker, conn, done = _a_worker_and_a_connection_kept_no_more(ours)
        worker.poller.register(ours, selectors.EVENT_READ)  # (taken: the registration fails)
        worker.finish_request(conn, done)
        assert ours.fileno() == -1 and worker.nr_conns == 0 and not worker.lingering


def test_a_closed_connection_lingers_in_the_poller_not_on_the_workers_thread(monkeypatch):
    """Its write side shut at once (the client reads the answer's end), then what the client still
    sends read as it comes, off the worker's poller, until LINGER_SECONDS have passed: gunicorn
    read it on the worker's main thread, which took no other connection meanwhile, 2 s a close."""
    linger = 1.0
    monkeypatch.setattr(JsonErrorsThreadWorker, "LINGER_SECONDS", linger)
    ours, peer = socket.socketpair()
    with peer:
        worker, conn, done = _a_worker_and_a_connection_kept_no_more(ours)
        started = time.monotonic()
        worker.finish_request(conn, done)
        # Returned with the socket open, its close left to the poller (gunicorn's returned once
        # it had closed it), and at once: well within the linger, however loaded the machine.
        assert ours.fileno() != -1 and time.monotonic() - started < linger / 2
        assert peer.recv(10) == b""  # (the write side shut)
        while ours.fileno() != -1:
            peer.sendall(b"x")  # (a client that goes on sending, now and then: well within
            time.sleep(0.01)  # the 64 KiB a close reads at most)
            worker.wait_for_and_dispatch_events(timeout=0.05)
            worker.murder_pending()
            assert time.monotonic() - started < 5, "the lingering close never ended"
    assert time.monotonic() - started >= linger and not worker.lingering
    assert worker.nr_conns == 0


def test_a_second_quit_signal_inside_the_first_ones_handling_is_let_be(monkeypatch):
    """Ctrl-C's SIGINT reaches a worker, then the arbiter's SIGQUIT on its heels, each running
    handle_quit, the second inside the first: there, inside gunicorn's shutdown of the thread
    pool, which holds a lock that is not reentrant, the second took it again and waited on itself
    for good (the arbiter killed the worker 30 s on: graceful_timeout). The second is let be, and
    the first exits the worker."""
    # (handle_quit tells this process's requests that last to stop: put back after the test)
    monkeypatch.setattr(process_stopping, "_stopping", False)
    worker = JsonErrorsThreadWorker.__new__(JsonErrorsThreadWorker)
    worker.cfg, worker.alive = Config(), True
    worker.tpool = ThreadPoolExecutor(1)

    class SecondSignalOnPut:
        """The pool's queue, the second signal's handler run as shutdown() puts its wake-up, under
        its lock (a signal's handler runs between any two steps of the main thread)."""

        def __init__(self, queue):
            self.queue, self.second_returned = queue, False

        def put(self, item):
            worker.handle_quit(signal.SIGQUIT, None)
            self.second_returned = True
            self.queue.put(item)

    queue = worker.tpool._work_queue = SecondSignalOnPut(worker.tpool._work_queue)
    exited = []

    def first_signal():
        try:
            worker.handle_quit(signal.SIGINT, None)
        except SystemExit:
            exited.append(True)

    handling = threading.Thread(target=first_signal, daemon=True)  # (held for good, without)
    handling.start()
    handling.join(5)
    assert not handling.is_alive(), "the second signal's handler waited on the first's lock"
    assert queue.second_returned and exited and not worker.alive


def test_the_arbiters_check_of_the_settings_leaves_each_worker_to_read_its_own(monkeypatch):
    """The arbiter checks the settings as it checks the worker class, and a worker it forks
    afterwards (after a HUP, say) checks them again as it loads the app: that check reads the
    worker's environment, a setting changed since refused. The arbiter's check once cached the
    settings it read (get_settings), and every worker it forked inherited them, its own check
    passing whatever its environment said. Here as after a fork: one process, the check cache
    cleared first (what another test read) and after (the refused value gone)."""
    cfg = Config()
    cfg.set("wsgi_app", "orders_app:create_app()")
    worker = JsonErrorsThreadWorker.__new__(JsonErrorsThreadWorker)
    # (gunicorn's app, whose wsgi() the worker loads once its check has passed)
    worker.cfg, worker.log = cfg, _Log()
    worker.app = types.SimpleNamespace(wsgi=lambda: "the app loaded, the change unseen")
    get_settings.cache_clear()
    try:
        JsonErrorsThreadWorker.check_config(cfg, worker.log)
        assert worker.log.errors == []
        monkeypatch.setenv("INBOX_MAX_ATTEMPTS", "five")

        with pytest.raises(SystemExit) as exited:
            worker.load_wsgi()
    finally:
        get_settings.cache_clear()
    assert exited.value.code == 3  # (gunicorn's WORKER_BOOT_ERROR: the arbiter stops)
    assert worker.log.errors == ["orders_app:create_app(): nothing served: INBOX_MAX_ATTEMPTS="
                                 "'five': expected a whole number"]


class _Log:
    """gunicorn's logger as the worker's checks use it: its error lines, kept."""

    def __init__(self):
        self.errors: list[str] = []

    def error(self, message, *args):
        self.errors.append(message % args)
