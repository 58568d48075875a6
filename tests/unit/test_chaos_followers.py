"""The chaos soak's notification follower (bench/chaos/followers.py) against a scripted stand-in
for the gateway (a local server, no shop): it opens its first socket after the newest id it read,
each next one with a ticket of its own after the last id it saw, and waits a refused ticket's
Retry-After before it asks again."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from bench.chaos import followers
from bench.chaos.followers import NotificationFollower
from bench.chaos.load import Shopper
from tests.polling import wait_for

USER = "u1"


def _notification(n: int) -> str:
    return json.dumps({"id": n, "type": "OrderStatusChanged", "created_at": "",
                       "payload": {"order_id": f"order-{n}", "user_id": USER,
                                   "status": "FINISHED"}})


class ScriptedGateway:
    """Answers the newest id (1), tickets as `tickets` lists them in turn (a ticket, or a
    status with its Retry-After), and each ticket's socket as `sockets` says: the notifications
    it sends, then a close code (None: held open until the gateway is closed). Keeps the times
    tickets were asked for, and each socket's query."""

    def __init__(self, tickets: list, sockets: dict[str, tuple[list[int], int | None]]):
        self.tickets, self.sockets = list(tickets), sockets
        self.ticket_times: list[float] = []
        self.socket_queries: list[dict] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            path = urlsplit(target).path
            if path == "/api/notifications/ws":
                self._socket(connection, head, parse_qs(urlsplit(target).query))
            elif path == "/api/notifications/newest":
                connection.sendall(_answer(200, {"id": 1}))
            else:
                self.ticket_times.append(time.monotonic())
                ticket = self.tickets.pop(0)
                connection.sendall(_answer(201, {"ticket": ticket, "expires_in": 30})
                                   if isinstance(ticket, str) else
                                   _answer(ticket[0], {}, {"Retry-After": str(ticket[1])}))

    def _socket(self, connection: socket.socket, head: bytes, query: dict) -> None:
        self.socket_queries.append({name: values[0] for name, values in query.items()})
        protocol = WSConnection(ConnectionType.SERVER)
        protocol.receive_data(head)
        assert any(isinstance(event, Request) for event in protocol.events())
        sent, close = self.sockets[query["ticket"][0]]
        out = protocol.send(AcceptConnection())
        for n in sent:
            out += protocol.send(TextMessage(data=_notification(n)))
        if close is not None:
            out += protocol.send(CloseConnection(code=close))
        connection.sendall(out)
        if close is None:
            self._closed.wait(10)


def _answer(status: int, body: dict, headers: dict | None = None) -> bytes:
    text = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
             f"Content-Length: {len(text)}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + text


def test_a_closed_socket_is_reopened_with_a_new_ticket_after_the_last_id_seen(monkeypatch):
    """The first socket, after the newest id (1), sends 2 and 3 and is closed 1011 (its gateway
    lost Redis); the next ticket is refused 503 with Retry-After: 1 (Redis still down), and the
    one after opens a socket after 3, which sends 4. (The backoff shortened, the Retry-After
    not.)"""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.05)
    gateway = ScriptedGateway(["first", (503, 1), "second"],
                              {"first": ([2, 3], 1011), "second": ([4], None)})
    follower = NotificationFollower(gateway.url, Shopper(USER, "token"), random.Random(1)).start()
    try:
        wait_for(lambda: follower.received_ids() == {2, 3, 4}, timeout=15,
                 what="the notifications of both sockets")
    finally:
        follower.stop()
        gateway.close()
    assert follower.started_after == 1
    assert [(run.after, [item.id for item in run.received], run.ended)
            for run in follower.sockets] == [(1, [2, 3], 1011), (3, [4], "stopped")]
    assert [query["after"] for query in gateway.socket_queries] == ["1", "3"]
    assert follower.refused == {"ticket 503": 1}
    assert gateway.ticket_times[2] - gateway.ticket_times[1] >= 1.0  # (its Retry-After)
