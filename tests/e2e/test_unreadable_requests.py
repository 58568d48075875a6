"""Requests gunicorn cannot read, answered before any app sees them: in the shop's JSON error
shape, as every other bad request is (shared/gunicorn_worker.py), not as gunicorn's HTML page;
requests Werkzeug would misread or redirect, or whose body cannot be read (shared/app.py); a body
the app refuses unread, which a client that asked whether to send it is not asked for, and the
connection of one that was asked for, or that had none to ask for, kept, and a request sent behind
it left to a new connection; and what gunicorn writes into every answer and every request's environ
(shared/gunicorn_worker.py)."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from shared.internal_auth import identity_headers
from tests.network_tools import http_answer_read_off, http_answer_read_off_a_kept_connection
from tests.process_tools import served_by_gunicorn
from tests.polling import wait_for

LONGEST_REQUEST_LINE = 4094  # gunicorn's limit_request_line
LONGEST_HEADER_FIELD = 8190  # its limit_request_field_size
MOST_HEADER_FIELDS = 100  # its limit_request_fields


def raw_exchange(url: str, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send `request` as it is, and read the answer (the server closes the connection after an
    error, or as the request asks)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(request)
        return http_answer_read_off(connection)


def get_with(path: str, *header_lines: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: shop.test", *header_lines, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def assert_json_error(answer, status: int, code: str) -> dict:
    status_line, headers, body = answer
    assert status_line.split(" ", 2)[1] == str(status), status_line
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["details"] == {}
    return error


@pytest.mark.parametrize("server", ["gateway", "orders", "payments"])
def test_a_request_line_over_gunicorns_limit_gets_a_json_414(stack, server):
    url = getattr(stack, f"{server}_url")
    path = "/api/orders?q=" + "x" * LONGEST_REQUEST_LINE
    error = assert_json_error(raw_exchange(url, get_with(path)), 414, "REQUEST_URI_TOO_LONG")
    assert str(LONGEST_REQUEST_LINE) in error["message"]


def test_too_many_header_fields_get_a_json_431(stack):
    headers = [f"X-Filler-{n}: {n}" for n in range(MOST_HEADER_FIELDS + 1)]
    answer = raw_exchange(stack.gateway_url, get_with("/api/orders", *headers))
    assert_json_error(answer, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")


def test_a_header_field_over_gunicorns_limit_gets_a_json_431(stack):
    header = "X-Filler: " + "x" * LONGEST_HEADER_FIELD
    answer = raw_exchange(stack.gateway_url, get_with("/api/orders", header))
    assert_json_error(answer, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")


def test_a_malformed_header_gets_a_json_400_that_names_it(stack):
    answer = raw_exchange(stack.gateway_url, get_with("/api/orders", "Bad Header: <b>x</b>"))
    error = assert_json_error(answer, 400, "BAD_REQUEST")
    assert "Bad Header" in error["message"]


def test_an_expectation_gunicorn_cannot_meet_gets_a_json_417(stack):
    answer = raw_exchange(stack.gateway_url, get_with("/health", "Expect: foo"))
    error = assert_json_error(answer, 417, "EXPECTATION_FAILED")
    assert "foo" in error["message"]


def test_a_transfer_coding_gunicorn_does_not_know_gets_a_json_501(stack):
    answer = raw_exchange(stack.gateway_url, get_with("/health", "Transfer-Encoding: foo"))
    assert_json_error(answer, 501, "NOT_IMPLEMENTED")


# Chunked bodies gunicorn's reader refuses as the app reads them (shared/app.py).
MALFORMED_CHUNKS = {
    "a chunk size that is no number": b"zz\r\n",
    "a chunk longer than it says": b"3\r\nabcdef\r\n0\r\n\r\n",
    # A body sent unframed though said to be chunked: gunicorn's error holds it as the chunk size.
    "a body that is not in chunks": b'{"password": "hunter2 secret"}\r\n',
}


@pytest.mark.parametrize("server, path", [("gateway", "/health"), ("gateway", "/api/orders"),
                                          ("orders", "/orders"), ("payments", "/health")])
@pytest.mark.parametrize("chunks", MALFORMED_CHUNKS.values(), ids=MALFORMED_CHUNKS)
def test_a_malformed_chunked_body_gets_a_json_400_and_the_connection_closed(stack, server, path,
                                                                           chunks):
    """Not a 500 with a traceback logged (and Connection: keep-alive, though gunicorn closed the
    connection): a client error, logged as one, before any sign-in is asked for. The request sent
    behind it on the connection gets no answer: where it starts is unknown."""
    request_id = uuid.uuid4().hex
    log = stack.logs_dir / f"{server}-api.log"
    logged_before = log.stat().st_size
    malformed = get_with(path, "Transfer-Encoding: chunked", f"X-Request-ID: {request_id}")
    answer = raw_exchange(getattr(stack, f"{server}_url"), malformed + chunks + get_with("/health"))
    error = assert_json_error(answer, 400, "BAD_REQUEST")  # (one answer: its length the body's)
    assert error["message"].startswith("The request body could not be read (")
    assert answer[1]["Connection"] == "close"

    def logged_since() -> str | None:
        with open(log, "rb") as written:
            written.seek(logged_before)
            text = written.read().decode("utf-8", "replace")
        return text if f"[request_id={request_id}] GET {path} -> 400" in text else None

    logged = wait_for(logged_since, timeout=10, what=f"the request's line in {log.name}")
    ours = [line for line in logged.splitlines() if f"[request_id={request_id}]" in line]
    assert any(" WARNING " in line and "could not be read" in line for line in ours), ours
    assert not any(" ERROR " in line for line in ours), ours
    assert "Traceback" not in logged
    # The body is neither logged nor answered back (it may hold a password).
    assert "hunter2" not in logged and "hunter2" not in error["message"]


def test_a_request_line_within_the_limit_still_reaches_the_app(stack):
    path = "/api/orders?q=" + "x" * 1000
    status_line, headers, body = raw_exchange(
        stack.gateway_url, get_with(path, "Connection: close"))
    assert status_line.split(" ", 2)[1] == "401", status_line  # the gateway's own answer
    assert json.loads(body)["error"]["code"] == "MISSING_TOKEN"


def test_a_chunked_body_over_the_limit_gets_a_json_413_not_its_beginning_read(stack):
    body = b'{"username": "' + b"x" * 70_000 + b'", "password": "long password"}'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[at:at + 8192]), body[at:at + 8192])
                       for at in range(0, len(body), 8192)) + b"0\r\n\r\n"
    head = "\r\n".join(["POST /api/auth/login HTTP/1.1", "Host: shop.test",
                         "Content-Type: application/json", "Transfer-Encoding: chunked",
                         "Connection: close", "", ""]).encode("latin-1")
    answer = raw_exchange(stack.gateway_url, head + chunked)
    assert_json_error(answer, 413, "REQUEST_ENTITY_TOO_LARGE")  # was a 400: its JSON cut off


# (Not under /orders/: there it is an order id's, "/x" in "/orders//x", shared/path_parameters.py.)
@pytest.mark.parametrize("server, path", [("gateway", "/api//orders"),
                                          ("payments", "/accounts//balance")])
def test_a_path_with_a_double_slash_gets_a_json_404_not_an_html_redirect(stack, server, path):
    answer = raw_exchange(getattr(stack, f"{server}_url"), get_with(path, "Connection: close"))
    assert_json_error(answer, 404, "NOT_FOUND")


def post_head(path: str, *header_lines: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: shop.test", "Content-Type: application/json",
             *header_lines, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def signed_identity(stack, server: str, path: str) -> list[str]:
    """The header lines of a signed identity for a POST to `path` (a service reads a body once
    one comes with it); none for the gateway."""
    if server == "gateway":
        return []
    return [f"{name}: {value}" for name, value in identity_headers(
        "someone", stack.env["INTERNAL_AUTH_SECRET"], "POST", path).items()]


@pytest.mark.parametrize("server, path", [("gateway", "/api/auth/login"),
                                          ("orders", "/orders"), ("payments", "/accounts")])
def test_a_body_over_the_limit_on_expect_100_continue_gets_a_413_and_no_100_first(stack, server,
                                                                                   path):
    """gunicorn sent `100 Continue` before the app ran, asking for a body the app then refused
    unread. Now the 413 is the only answer, and the connection closes after it: the client may
    send the body or not. (A service reads a body once a signed identity comes with it.)"""
    identity = signed_identity(stack, server, path)
    head = post_head(path, "Content-Length: 70000", "Expect: 100-continue", *identity)
    answer = raw_exchange(getattr(stack, f"{server}_url"), head)  # (no body sent)
    assert_json_error(answer, 413, "REQUEST_ENTITY_TOO_LARGE")
    assert answer[1]["Connection"] == "close"


@pytest.mark.parametrize("body_sent", [True, False], ids=["body sent", "body held back"])
@pytest.mark.parametrize("server, path", [("gateway", "/api/auth/login"),
                                          ("orders", "/orders"), ("payments", "/accounts")])
def test_a_request_sent_behind_a_body_refused_on_expect_100_continue_is_left_to_a_new_connection(
        stack, server, path, body_sent):
    """The connection closes after the 413, whether the client sent the body or held it back: a
    request pipelined behind it is not answered (where it starts is unknown), and the 413 says
    `Connection: close`, so that the client knows to send that request again on a new connection
    (RFC 9112 9.3.2), rather than wait for an answer that never comes."""
    identity = signed_identity(stack, server, path)
    head = post_head(path, "Content-Length: 70000", "Expect: 100-continue", *identity)
    body = b"x" * 70000 if body_sent else b""
    answer = raw_exchange(getattr(stack, f"{server}_url"), head + body + get_with("/health"))
    assert_json_error(answer, 413, "REQUEST_ENTITY_TOO_LARGE")  # (one answer: nothing after it)
    assert answer[1]["Connection"] == "close"


def test_a_body_within_the_limit_on_expect_100_continue_is_asked_for_read_and_kept_alive(stack):
    """The `100 Continue` comes once the app reads the body, which it then has whole; the body
    read, the connection is kept alive (only an owed 100 closes it), and the next request sent on
    it is answered."""
    body = b'{"username": "nobody-%s", "password": "not the password"}' % uuid.uuid4().hex.encode()
    head = post_head("/api/auth/login", f"Content-Length: {len(body)}", "Expect: 100-continue")
    parts = urlsplit(stack.gateway_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(head)
        interim = b""
        while not interim.endswith(b"\r\n\r\n") and (byte := connection.recv(1)):
            interim += byte
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        answer = http_answer_read_off_a_kept_connection(connection)
        assert_json_error(answer, 401, "INVALID_CREDENTIALS")
        assert answer[1]["Connection"] == "keep-alive"
        connection.sendall(get_with("/health", "Connection: close"))
        status_line, _, _ = http_answer_read_off(connection)
    assert status_line.split(" ", 2)[1] == "200", status_line


@pytest.mark.parametrize("server, path", [("gateway", "/health"), ("orders", "/health")])
def test_a_get_on_expect_100_continue_is_sent_no_100_and_kept_alive(stack, server, path):
    """A GET has no body to ask for: its answer (given without reading one) closed the connection
    as though the client might still send one."""
    parts = urlsplit(getattr(stack, f"{server}_url"))
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(get_with(path, "Expect: 100-continue"))
        status_line, headers, _ = http_answer_read_off_a_kept_connection(connection)
        assert status_line.split(" ", 2)[1] == "200", status_line  # (no 100 before it)
        assert headers["Connection"] == "keep-alive"
        connection.sendall(get_with(path, "Connection: close"))
        status_line, _, _ = http_answer_read_off(connection)
    assert status_line.split(" ", 2)[1] == "200", status_line


@pytest.mark.parametrize("server", ["gateway", "orders", "payments"])
def test_no_answer_names_the_server_software(stack, server):
    """gunicorn wrote `Server: gunicorn` into every answer, which only tells a prober what to try:
    the apps' answers, a 200 and an error alike, name no server."""
    url = getattr(stack, f"{server}_url")
    for request, status in ((get_with("/health", "Connection: close"), "200"),
                            (get_with("/nowhere", "Connection: close"), "404")):
        status_line, headers, _ = raw_exchange(url, request)
        assert status_line.split(" ", 2)[1] == status, status_line
        assert "server" not in {name.lower() for name in headers}, headers


@pytest.fixture(scope="module")
def gunicorn_naming_its_server_software(run_dir, note_started):
    """The URL of a gunicorn run as the APIs are (the shop's worker class, in a worker forked off
    its master), but with one worker, serving an app that answers with the SERVER_SOFTWARE its
    request's environ and its worker's process environment hold."""
    with served_by_gunicorn("server-software-app",
                            "tests.e2e.server_software_app:answer_the_server_software", run_dir,
                            note_started, workers=1) as url:
        yield url


def test_a_requests_environ_names_no_server_software(gunicorn_naming_its_server_software):
    """gunicorn wrote `gunicorn/<version>` into every request's environ as SERVER_SOFTWARE (the
    version, which its `Server` header never said), for an app's page or log to pass on: it is
    there, for an app that reads it, and empty. Its arbiter put the same into the master's process
    environment, inherited by each worker and whatever the app starts: the worker's has none."""
    status_line, _, body = raw_exchange(gunicorn_naming_its_server_software,
                                        get_with("/", "Connection: close"))
    assert status_line.split(" ", 2)[1] == "200", status_line
    assert json.loads(body) == {"environ": "", "process": None}
