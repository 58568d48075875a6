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

from wsproto.events import CloseConnection, TextMessage

from bench.chaos import followers
from bench.chaos.followers import Followers, NotificationFollower
from bench.chaos.load import Shopper
from tests.network_tools import Accepting
from tests.polling import wait_for
from tests.websocket_server import accept_sending, request_head

USER, USERNAME, PASSWORD = "u1", "shopper-u1", "a long password"


def _shopper() -> Shopper:
    """The shopper as registered (their session's token is the one they registered with: a
    sign-in made in one test is not another's)."""
    return Shopper(USER, "token", USERNAME, PASSWORD)


# A socket whose handshake the stand-in never answers (a gateway SIGSTOPped as it is sent).
UNANSWERED = "unanswered"


def _notification(n: int) -> str:
    return json.dumps({"id": n, "type": "OrderStatusChanged", "created_at": "",
                       "payload": {"order_id": f"order-{n}", "user_id": USER,
                                   "status": "FINISHED"}})


class ScriptedGateway:
    """A stand-in for the gateway as a follower uses it, scripted. GET /api/notifications/newest
    answers 1, and POST /api/notifications/tickets the tickets `tickets` lists in turn (a ticket,
    or a status with its Retry-After), each with a token signed in (its Authorization), 401
    without. Each ticket's socket does as `sockets` says: the notifications it sends, then its
    close (a code, or a code and its reason; None: held open until the gateway is closed), or the
    status its handshake is refused with (an int), or UNANSWERED; a close 1008 expires every token
    given so far, as the gateway closes the socket of a token that expires. POST /api/auth/login
    with the shopper's username and password gives a new token. Keeps the times tickets were
    asked for, each socket's query, and the sign-ins."""

    def __init__(self, tickets: list,
                 sockets: dict[str, tuple[list[int], int | tuple | None] | int | str]):
        self.tickets, self.sockets = list(tickets), sockets
        self.tokens = {"token"}  # (the token the shopper registered with)
        self.ticket_times: list[float] = []
        self.socket_queries: list[dict] = []
        self.sign_ins: list[dict] = []
        self._closed = threading.Event()
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self._accepting = Accepting(listener, lambda connection: threading.Thread(
            target=self._serve, args=(connection,), daemon=True).start())

    def close(self) -> None:
        self._closed.set()
        self._accepting.close()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            head = request_head(connection)
            if head is None:  # (the follower gone before it sent a request)
                return
            lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers = {name.lower(): value
                       for name, value in (line.split(": ", 1) for line in lines[1:])}
            path = urlsplit(target).path
            signed_in = headers.get("authorization", "").removeprefix("Bearer ") in self.tokens
            if (method, path) == ("GET", "/api/notifications/ws"):
                self._socket(connection, head, parse_qs(urlsplit(target).query))
            elif (method, path) == ("POST", "/api/auth/login"):
                connection.sendall(self._sign_in(json.loads(_body(connection, head, headers))))
            elif not signed_in:
                connection.sendall(_answer(401, {"error": {"code": "TOKEN_EXPIRED"}}))
            elif (method, path) == ("GET", "/api/notifications/newest"):
                connection.sendall(_answer(200, {"id": 1}))
            elif (method, path) == ("POST", "/api/notifications/tickets"):
                self.ticket_times.append(time.monotonic())
                ticket = self.tickets.pop(0)
                connection.sendall(_answer(201, {"ticket": ticket, "expires_in": 30})
                                   if isinstance(ticket, str) else
                                   _answer(ticket[0], {}, {"Retry-After": str(ticket[1])}))
            else:
                connection.sendall(_answer(404, {}))

    def _sign_in(self, credentials: dict) -> bytes:
        self.sign_ins.append(credentials)
        if credentials != {"username": USERNAME, "password": PASSWORD}:
            return _answer(401, {"error": {"code": "INVALID_CREDENTIALS"}})
        token = f"token-{len(self.sign_ins) + 1}"
        self.tokens.add(token)
        return _answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600})

    def _socket(self, connection: socket.socket, head: bytes, query: dict) -> None:
        self.socket_queries.append({name: values[0] for name, values in query.items()})
        script = self.sockets[query["ticket"][0]]
        if script == UNANSWERED:
            self._closed.wait(10)
            return
        if isinstance(script, int):
            connection.sendall(_answer(script, {"error": {"code": "RATE_LIMITED"}},
                                       {"Retry-After": "60"}))
            return
        sent, close = script
        frames = [TextMessage(data=_notification(n)) for n in sent]
        if close is not None:
            code, reason = close if isinstance(close, tuple) else (close, None)
            frames.append(CloseConnection(code=code, reason=reason))
            if code == 1008:
                self.tokens.clear()
        accept_sending(connection, head, frames)
        if close is None:
            self._closed.wait(10)


def _body(connection: socket.socket, head: bytes, headers: dict) -> bytes:
    """The request's body: what came with its head after the blank line, and the rest read."""
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < int(headers.get("content-length", 0)):
        body += connection.recv(65536)
    return body


def _answer(status: int, body: dict, headers: dict | None = None) -> bytes:
    text = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
             f"Content-Length: {len(text)}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + text


def _followed(gateway: ScriptedGateway, ids: set[int], what: str,
              shopper: Shopper | None = None) -> NotificationFollower:
    """A follower of the stand-in's (of `shopper`, or one as registered), stopped (and the
    stand-in closed) once its sockets have sent the notifications `ids`."""
    follower = NotificationFollower(gateway.url, shopper or _shopper(), random.Random(1)).start()
    try:
        wait_for(lambda: follower.received_ids() == ids, timeout=15, what=what)
    finally:
        follower.stop()
        gateway.close()
    return follower


def test_a_closed_socket_is_reopened_with_a_new_ticket_after_the_last_id_seen(monkeypatch):
    """The first socket, after the newest id (1), sends 2 and 3 and is closed 1011 (its gateway
    lost Redis); the next ticket is refused 503 with Retry-After: 1 (Redis still down), and the
    one after opens a socket after 3, which sends 4. (The backoff shortened, the Retry-After
    not.)"""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.05)
    gateway = ScriptedGateway(["first", (503, 1), "second"],
                              {"first": ([2, 3], 1011), "second": ([4], None)})
    follower = _followed(gateway, {2, 3, 4}, "the notifications of both sockets")
    assert follower.started_after == 1
    assert [(run.after, [item.id for item in run.received], run.ended)
            for run in follower.sockets] == [(1, [2, 3], 1011), (3, [4], "stopped")]
    assert [query["after"] for query in gateway.socket_queries] == ["1", "3"]
    assert follower.refused == {"ticket 503": 1}
    assert gateway.ticket_times[2] - gateway.ticket_times[1] >= 1.0  # (its Retry-After)


def test_a_follower_whose_token_expired_signs_in_again_and_follows_on(monkeypatch):
    """A run longer than AUTH_TOKEN_TTL_SECONDS: the gateway closes the socket 1008 as the token
    expires and refuses its tickets 401 from then on. The follower signs in again with the
    shopper's name and password, as the page's user does once it shows its sign-in form, and asks
    for the next ticket with the new token (it asked with the expired one for ever, and every
    later notification was reported never to have reached its sockets)."""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.05)
    gateway = ScriptedGateway(["first", "second"],
                              {"first": ([2, 3], (1008, "token expired")), "second": ([4], None)})
    follower = _followed(gateway, {2, 3, 4}, "the notifications before and after the sign-in")
    assert gateway.sign_ins == [{"username": USERNAME, "password": PASSWORD}]
    assert [(run.after, run.ended) for run in follower.sockets] == [(1, 1008), (3, "stopped")]
    assert follower.refused == {"ticket 401": 1}


def test_a_follower_takes_the_token_the_load_signed_its_shopper_in_with(monkeypatch):
    """The shopper's token is one for all that acts for them (bench/chaos/sign_in.py): signed in
    again by the load's threads as it expired, the follower uses the new one, and signs in no
    more (each follower signed in on its own, and the load not at all)."""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.05)
    gateway = ScriptedGateway(["first"], {"first": ([2], None)})
    shopper = _shopper()
    assert shopper.session.sign_in_again(gateway.url, "token").made  # (the load's)
    gateway.tokens.discard("token")  # (the registered one expired)
    follower = _followed(gateway, {2}, "the notification", shopper)
    assert len(gateway.sign_ins) == 1 and follower.signed_in_again == 0
    assert follower.refused == {}


def test_a_socket_closed_1013_is_opened_again_no_sooner_than_its_try_again_in(monkeypatch):
    """Past the user's rate limit the gateway closes the socket 1013 and names the wait ("try
    again in N s"), which the page keeps to: no ticket asked for before then."""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.05)
    gateway = ScriptedGateway(["first", "second"], {
        "first": ([2], (1013, "Too many requests; try again in 1 s.")), "second": ([3], None)})
    _followed(gateway, {2, 3}, "the notifications of both sockets")
    assert gateway.ticket_times[1] - gateway.ticket_times[0] >= 1.0


def test_sockets_turned_away_back_off_further_than_sockets_closed(monkeypatch):
    """A handshake refused (429, past its address's handshakes: a page sees a socket closed 1006,
    never opened) backs off as the page's does, doubling past the longest wait after a socket
    that opened and closed (RECONNECT_MAX_SECONDS), to RECONNECT_TURNED_AWAY_MAX_SECONDS."""
    monkeypatch.setattr(followers, "RECONNECT_FIRST_SECONDS", 0.1)
    monkeypatch.setattr(followers, "RECONNECT_MAX_SECONDS", 0.1)
    monkeypatch.setattr(followers, "RECONNECT_TURNED_AWAY_MAX_SECONDS", 0.4)
    refused = ["a", "b", "c", "d"]
    gateway = ScriptedGateway([*refused, "open"], {**{ticket: 429 for ticket in refused},
                                                  "open": ([2], None)})
    follower = _followed(gateway, {2}, "the socket at last opened")
    assert follower.refused == {"handshake ConnectionError": 4}
    # Waits of 0.1, 0.2, 0.4 and 0.4 s, give or take a quarter.
    times = gateway.ticket_times
    waits = [later - earlier for earlier, later in zip(times, times[1:])]
    assert waits[-1] >= 0.3 and waits[-2] >= 0.3, waits


def test_a_follower_that_does_not_stop_in_time_is_named_not_waited_for(monkeypatch):
    """A follower held in a handshake the gateway does not answer (SIGSTOPped) stops once its
    timeout is out; stopping the followers waits STOP_SECONDS for them at most and names those
    still running, where it waited for them without end (and a Ctrl-C with it)."""
    monkeypatch.setattr(followers, "STOP_SECONDS", 0.5)
    gateway = ScriptedGateway(["held"], {"held": UNANSWERED})
    follower = NotificationFollower(gateway.url, _shopper(), random.Random(1)).start()
    try:
        wait_for(lambda: gateway.socket_queries, timeout=10, what="the socket's handshake")
        began = time.monotonic()
        followed = Followers([follower])
        assert followed.stop() == [USER]
        assert time.monotonic() - began < 2
        # Stopped again (the block's end after the checks'): no second STOP_SECONDS of waiting.
        monkeypatch.setattr(followers, "STOP_SECONDS", 30)
        again = time.monotonic()
        assert followed.stop() == [USER]
        assert time.monotonic() - again < 1
    finally:
        gateway.close()
