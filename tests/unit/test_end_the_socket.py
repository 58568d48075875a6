"""gateway_app.notifications.end_the_socket, over a real simple_websocket server socket (the one
Flask-Sock makes of gunicorn's connection): it returns once simple_websocket's reader has closed
the connection, so that the web server, seeing the request return, finds it closed."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time

from simple_websocket import Server

from gateway_app import notifications


class ClosedLate(socket.socket):
    """A connection whose close comes late: the reader thread, descheduled on a loaded machine
    between its recv()'s end and its close."""

    def close(self):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)  # (the late close: the scenario, not a wait)
        super().close()


def _a_server_socket(connection: socket.socket) -> Server:
    """simple_websocket's server side of `connection`, its handshake answered (as Flask-Sock makes
    it of gunicorn's WSGI environ)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return Server({"gunicorn.socket": connection, "HTTP_HOST": "shop.test",
                   "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
                   "HTTP_SEC_WEBSOCKET_KEY": key, "HTTP_SEC_WEBSOCKET_VERSION": "13"})


def test_a_socket_whose_page_stays_silent_is_closed_by_its_reader_before_it_returns():
    """The page answers nothing: the connection is shut down after SOCKET_CLOSE_ANSWER_SECONDS,
    and the reader, woken, closes it. Returned before that close, the server took the connection
    for one to close itself, and the reader's close left a stale entry in the server's poller."""
    ours, page = socket.socketpair()
    connection = ClosedLate(ours.family, ours.type, fileno=ours.detach())
    with page:
        ws = _a_server_socket(connection)
        started = time.monotonic()
        notifications.end_the_socket(ws)
        assert not ws.thread.is_alive() and connection.fileno() == -1
        # (bounded: the close answer's wait, the reader's end)
        assert time.monotonic() - started < (notifications.SOCKET_CLOSE_ANSWER_SECONDS
                                             + notifications.SOCKET_READER_END_SECONDS)
        received = b""
        while chunk := page.recv(4096):
            received += chunk
        assert b"\r\n\r\n\x88" in received  # (the 101, then the close, unanswered)
