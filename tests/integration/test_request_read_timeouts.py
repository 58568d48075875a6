"""How long the web server waits on a request's client (shared/gunicorn_worker.py:
TimedSocketUnreader): a gateway served by gunicorn with the shop's worker class, as the stack serves
it but with 4 threads (a service's) and timeouts of a few seconds at most, asked over real sockets.
A head or body that stops arriving, or a head trickled a byte at a time, is answered 408 and its
connection closed, so that a slow client holds a thread no longer than the timeouts; what takes
longer once answered (a notification socket quiet past the timeouts) and a kept-alive connection
quiet between requests are left alone. (tests/unit/test_gunicorn_worker.py: the socket is left as it
was after each read, for the answer's writes too.)"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
import uuid
from contextlib import ExitStack
from datetime import datetime, timezone
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
from simple_websocket import ConnectionClosed

from bench.websocket_client import WebSocketClient
import gateway_app
from gateway_app import notifications
from gateway_app.tokens import issue_token
from shared.contracts import ORDER_STATUS_CHANGED, new_event
from shared.db import transaction
from shared.inbox.handling import ReceivedEvent, StoredMessage
from tests.network_tools import http_answer_read_off, http_answer_read_off_a_kept_connection
from tests.process_tools import served_by_gunicorn

# A second or so: the slow clients below send a byte every third of READ_TIMEOUT, which a loaded
# machine must keep within it.
READ_TIMEOUT = 1.0  # REQUEST_READ_TIMEOUT_SECONDS of the served gateway
HEAD_TIMEOUT = 3.0  # its REQUEST_HEAD_TIMEOUT_SECONDS
KEEPALIVE = 2.0  # gunicorn's keep-alive (its default: the stack sets none)
THREADS = 4  # a service's (the gateway's 200 would take a long while to fill)
# Well past either timeout, well within a test's patience: a wait for an answer that, without the
# timeouts, would never come.
ANSWER_WITHIN = 10.0


@pytest.fixture(scope="module")
def served_gateway(settings, run_dir, note_started):
    """The URL of a gateway served as the stack serves it (gunicorn, the shop's worker class),
    with one worker of THREADS threads, and the timeouts above."""
    env = {**os.environ, "REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
           "REQUEST_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT)}
    with served_by_gunicorn("read-timeouts-gateway", "gateway_app:create_app()", run_dir,
                            note_started, env, threads=THREADS, workers=1) as url:
        # (the worker's app built: the first answer comes once it is)
        with _connected(url, timeout=30) as connection:
            connection.sendall(_get("/health", "Connection: close"))
            assert http_answer_read_off(connection)[0].split(" ", 2)[1] == "200"
        yield url


def _connected(url: str, timeout: float = ANSWER_WITHIN) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def _get(path: str, *header_lines: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: shop.test", *header_lines, "", ""]
                       ).encode("latin-1")


def _post_head(path: str, *header_lines: str) -> bytes:
    return _get(path, "Content-Type: application/json", *header_lines).replace(b"GET ", b"POST ",
                                                                               1)


def _assert_timed_out(answer) -> dict:
    status_line, headers, body = answer
    assert status_line.split(" ", 2)[1] == "408", (status_line, body)
    assert headers["Connection"] == "close"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == "REQUEST_TIMEOUT" and error["message"] and error["details"] == {}
    return error


def _answer_to_a_stalled_request(url: str, sent: bytes):
    """What is answered to `sent` followed by nothing, read to the connection's end, and how long
    after the send the answer came."""
    with _connected(url) as connection:
        connection.sendall(sent)
        started = time.monotonic()
        answer = http_answer_read_off(connection)
        return answer, time.monotonic() - started


def test_a_head_that_stops_arriving_gets_a_json_408_and_the_connection_closed(served_gateway):
    answer, waited = _answer_to_a_stalled_request(
        served_gateway, b"GET /health HTTP/1.1\r\nHost: shop.test\r\nX-Filler: a")
    error = _assert_timed_out(answer)
    assert "head" in error["message"]
    assert READ_TIMEOUT * 0.9 <= waited < HEAD_TIMEOUT, waited


def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_head_timeout(served_gateway):
    """Each byte within the read timeout of the one before: the head's own deadline ends it."""
    with _connected(served_gateway) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: shop.test\r\nX-Filler: ")
        started = time.monotonic()
        while time.monotonic() - started < ANSWER_WITHIN:
            readable, _, _ = select.select([connection], [], [], READ_TIMEOUT / 3)
            if readable:
                break
            connection.sendall(b"x")
        waited = time.monotonic() - started
        answer = http_answer_read_off(connection)
    _assert_timed_out(answer)
    assert HEAD_TIMEOUT * 0.9 <= waited < HEAD_TIMEOUT + 2 * READ_TIMEOUT, waited


@pytest.mark.parametrize("sent", [
    # Less body than its Content-Length says.
    _post_head("/api/auth/login", "Content-Length: 60") + b'{"username": "someone",',
    # Chunks that never end (a chunked body is read before any sign-in: shared/app.py).
    _post_head("/api/auth/login", "Transfer-Encoding: chunked") + b"5\r\n{\"use\r\n",
], ids=["a body short of its Content-Length", "chunks that never end"])
def test_a_body_that_stops_arriving_gets_the_apps_json_408_and_the_connection_closed(
        served_gateway, sent):
    """The app's read fails, and it answers 408, not 400 (the client gone) nor 500: through the
    app, so with its request id."""
    answer, waited = _answer_to_a_stalled_request(served_gateway, sent)
    error = _assert_timed_out(answer)
    assert "body" in error["message"]
    assert "X-Request-ID" in answer[1]
    assert READ_TIMEOUT * 0.9 <= waited < ANSWER_WITHIN, waited


def test_a_body_asked_for_with_100_continue_and_never_sent_gets_a_408(served_gateway):
    with _connected(served_gateway) as connection:
        connection.sendall(_post_head("/api/auth/login", "Content-Length: 60",
                                      "Expect: 100-continue"))
        answer = http_answer_read_off(connection)
    status_line, head_and_answer = answer[0], answer[2]
    assert status_line == "HTTP/1.1 100 Continue"
    # (the 408 follows the 100 on the connection)
    head, _, body = head_and_answer.partition(b"\r\n\r\n")
    final_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    _assert_timed_out((final_line, headers, body))


def _answered_while_others_trickle(url: str, trickling: list[socket.socket]) -> tuple[bytes, float]:
    """What a GET on a new connection is answered, read to the connection's end while each of
    `trickling` is sent a byte every third of the read timeout (until its connection is closed),
    and after how long."""
    with _connected(url) as connection:
        started = time.monotonic()
        connection.sendall(_get("/health", "Connection: close"))
        connection.setblocking(False)
        received = b""
        while time.monotonic() - started < ANSWER_WITHIN:
            for trickler in trickling:
                with contextlib.suppress(OSError):  # (closed: a trickler no more)
                    trickler.sendall(b"x")
            select.select([connection], [], [], READ_TIMEOUT / 3)
            try:
                chunk = connection.recv(65536)
            except BlockingIOError:
                continue
            received += chunk
            if not chunk:
                break
        return received, time.monotonic() - started


def test_slow_clients_no_longer_hold_every_thread(served_gateway):
    """More trickling clients than the server has threads, each sending its head a byte at a time
    within the read timeout: a request sent after them is answered all the same, once the head
    timeout has freed the threads."""
    with ExitStack() as held:
        slow = [held.enter_context(_connected(served_gateway)) for _ in range(THREADS + 2)]
        for connection in slow:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: shop.test\r\nX-Filler: ")
        received, _ = _answered_while_others_trickle(served_gateway, slow)
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]


def test_clients_that_go_on_sending_after_their_answer_hold_nobody_up(served_gateway):
    """A closed connection's close lingers (what its client still sends is read and dropped, up to
    2 s), off the worker's poller: on its main thread, as gunicorn lingered, a few such clients
    held the worker up, accepting nothing, 2 s each in turn."""
    with ExitStack() as held:
        answered = [held.enter_context(_connected(served_gateway)) for _ in range(THREADS + 2)]
        for connection in answered:
            connection.sendall(_get("/health", "Connection: close"))
            status_line, _, _ = http_answer_read_off_a_kept_connection(connection)
            assert status_line.split(" ", 2)[1] == "200", status_line
        received, waited = _answered_while_others_trickle(served_gateway, answered)
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert waited < 1.5, waited


def test_a_stopping_worker_waits_for_its_lingering_closes(settings, run_dir, note_started):
    """A worker that stops after its answer (here, its max_requests served) waits for the
    connections it still closes (gthread's stop waits while it counts any open): a client that
    goes on uploading after a 413 has what it sends read and dropped for the linger's 2 s. A
    lingering close counted off before it ended let the worker exit at once, and its kernel
    reset the connection: the client's next sends failed (EPIPE, ECONNRESET)."""
    env = {**os.environ, "GUNICORN_CMD_ARGS": "--max-requests 1"}
    with served_by_gunicorn("stopping-gateway", "gateway_app:create_app()", run_dir,
                            note_started, env, threads=THREADS, workers=1) as url:
        # (the first worker's app built, and its one request served: the next worker serves the
        # request below, and stops after it)
        with _connected(url, timeout=30) as connection:
            connection.sendall(_get("/health", "Connection: close"))
            assert http_answer_read_off(connection)[0].split(" ", 2)[1] == "200"
        with _connected(url, timeout=30) as connection:
            connection.sendall(_post_head("/api/auth/login", "Content-Length: 10000000"))
            status_line, _, _ = http_answer_read_off_a_kept_connection(connection)
            assert status_line.split(" ", 2)[1] == "413", status_line
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < 1.0:  # (within the linger, under its 64 KiB)
                try:
                    connection.sendall(b"x" * 1024)
                except OSError as exc:
                    pytest.fail(f"the upload failed {time.monotonic() - started:.2f} s after"
                                f" the answer, {sent} bytes sent: {exc!r}")
                sent += 1024
                time.sleep(0.1)  # (a client uploading, a KiB at a time)


def test_a_kept_alive_connection_quiet_past_the_read_timeout_is_still_served(served_gateway):
    """The quiet between two requests is gunicorn's keep-alive (2 s), not a read of a request: a
    quiet past the read timeout, within the keep-alive."""
    with _connected(served_gateway) as connection:
        connection.sendall(_get("/health"))
        status_line, headers, _ = http_answer_read_off_a_kept_connection(connection)
        assert status_line.split(" ", 2)[1] == "200" and headers["Connection"] == "keep-alive"
        time.sleep((READ_TIMEOUT + KEEPALIVE) / 2)  # (what is tested: the quiet)
        connection.sendall(_get("/health", "Connection: close"))
        status_line, _, _ = http_answer_read_off(connection)
    assert status_line.split(" ", 2)[1] == "200", status_line


def test_a_body_sent_after_its_100_continue_within_the_timeout_is_read(served_gateway):
    """The read timeout counts from each read: a client asked for its body sends it in time."""
    body = b'{"username": "nobody-%s", "password": "not the password"}' % uuid.uuid4().hex.encode()
    with _connected(served_gateway) as connection:
        connection.sendall(_post_head("/api/auth/login", f"Content-Length: {len(body)}",
                                      "Expect: 100-continue", "Connection: close"))
        interim = b""
        while not interim.endswith(b"\r\n\r\n") and (byte := connection.recv(1)):
            interim += byte
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        for at in range(0, len(body), 20):  # in parts, each within the read timeout
            connection.sendall(body[at:at + 20])
            time.sleep(READ_TIMEOUT / 3)  # (a slow client: the scenario, not a wait)
        status_line, _, answered = http_answer_read_off(connection)
    assert status_line.split(" ", 2)[1] == "401", (status_line, answered)
    assert json.loads(answered)["error"]["code"] == "INVALID_CREDENTIALS"


def _status_change(user: str) -> ReceivedEvent:
    """An OrderStatusChanged event for `user`, as the gateway's inbox hands it over."""
    event = new_event(ORDER_STATUS_CHANGED, {
        "order_id": uuid.uuid4(), "user_id": user, "amount": Decimal("1.00"),
        "status": "FINISHED", "reason": None, "updated_at": datetime.now(timezone.utc)})
    return ReceivedEvent(event.payload, StoredMessage(event.message_id, event.type, None, None,
                                                      event.payload_json(), done=False,
                                                      envelope_version=event.version))


def test_a_notification_socket_quiet_past_the_timeouts_stays_open_and_is_sent_to(
        settings, served_gateway):
    """Once upgraded, the socket is read by the gateway as the page sends on it, which it may not
    do for minutes: no timeout of a request's head or body holds for it (a socket left with one
    closed as soon as its page had been quiet that long)."""
    user = f"usr_{uuid.uuid4().hex[:16]}"
    token = issue_token(user, f"quiet-{uuid.uuid4().hex[:8]}", settings.auth_token_secret,
                        settings.auth_token_ttl_seconds)
    url = (served_gateway.replace("http://", "ws://")
           + f"/api/notifications/ws?access_token={token.access_token}")
    socket_ = WebSocketClient.connect(url)
    try:
        try:
            quiet = socket_.receive(timeout=HEAD_TIMEOUT * 2)  # (what is tested: the quiet)
        except ConnectionClosed:
            pytest.fail(f"the socket was closed while quiet ({socket_.close_reason})")
        assert quiet is None
        gateway = gateway_app.create_app(settings=settings)
        with gateway.app_context(), transaction() as session:
            notifications.on_order_status_changes(session, [_status_change(user)])
        sent = json.loads(socket_.receive(timeout=ANSWER_WITHIN) or "null")
        assert sent and sent["type"] == ORDER_STATUS_CHANGED
        assert sent["payload"]["user_id"] == user
    finally:
        socket_.close()
