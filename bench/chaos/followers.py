"""Shoppers who keep the gateway's notification socket open for the whole run, as the web page does
(gateway_app/web/app.js): the newest notification's id read first, then a socket opened with a
ticket of its own, `after` the last id seen; after each close (1011 as the gateway loses Redis, a
gunicorn child killed under it, a ticket lost with Redis's keys), a new ticket and a new socket,
so that what it missed while away is sent first. It waits as the page does: 0.5 s doubling to
10 s, jittered by a quarter, from the shortest again once a socket has worked; to 30 s after a
socket turned away (its handshake refused, as with a 429, or closed 1013) or a ticket refused;
never sooner than a Retry-After, or than a 1013's "try again in N s". Its token expired (a run
longer than AUTH_TOKEN_TTL_SECONDS: the socket closed 1008, the next ticket refused 401
TOKEN_EXPIRED), the shopper signs in again, as the page's user does at its sign-in form (unless the
load's threads for them did: the token is theirs too, sign_in.py), and it follows on. What each
socket sent is kept, for the invariant (invariants.socket_deliveries)."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests
from simple_websocket import ConnectionClosed

from bench.chaos.load import Shopper
from bench.chaos.sign_in import refused_as_expired, retry_after
from bench.notification_socket import ask_for_a_ticket, socket_url
from bench.websocket_client import HANDSHAKE_SECONDS, WebSocketClient

RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
# A socket turned away (its handshake refused, as with a 429, or closed 1013), and a ticket
# refused, back off to this at most, as the page's (its RECONNECT_TURNED_AWAY_MAX_MS).
RECONNECT_TURNED_AWAY_MAX_SECONDS = 30.0
# A socket that stayed open this long worked: the next reconnect waits the shortest again.
SOCKET_WORKED_SECONDS = 5.0
# The wait a rate-limited socket's close (1013) names, as the gateway words it (the page's
# TRY_AGAIN_IN).
TRY_AGAIN_IN = re.compile(r"try again in (\d+) s", re.IGNORECASE)
# How long a follower waits for each frame before it looks whether it is to stop.
RECEIVE_SECONDS = 0.5
REQUEST_TIMEOUT = 10
# How long stopping the followers waits for them: one request's or one handshake's timeouts (a
# connect and a read), and some.
STOP_SECONDS = 2 * max(REQUEST_TIMEOUT, HANDSHAKE_SECONDS) + 5


@dataclass(frozen=True)
class Delivery:
    """A notification as a socket sent it, or as the gateway keeps it."""

    id: int
    user_id: str
    order_id: str
    status: str


@dataclass
class SocketRun:
    """One socket, opened `after` an id: what it sent, in the order sent, and how it ended (its
    close code, or the name of what ended it; None while open)."""

    after: int
    received: list[Delivery] = field(default_factory=list)
    ended: int | str | None = None


class NotificationFollower:
    """One shopper's notification socket, kept open (reopened) from start() to stop()."""

    def __init__(self, gateway_url: str, shopper: Shopper, rng: random.Random):
        self.gateway, self.shopper, self.rng = gateway_url, shopper, rng
        # The newest notification's id read before the first socket: every one after it is owed.
        self.started_after: int | None = None
        self.sockets: list[SocketRun] = []
        # The sign-ins it made again (the shopper's token, shopper.session's, expired).
        self.signed_in_again = 0
        self._delay = RECONNECT_FIRST_SECONDS  # (the page's reconnectDelay)
        # The answers that gave no socket, by kind (a ticket refused, a handshake failed).
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True,
                                        name=f"chaos-socket-{shopper.user_id}")

    @property
    def user_id(self) -> str:
        return self.shopper.user_id

    def start(self) -> NotificationFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop following; whether it has stopped within `timeout` (STOP_SECONDS by default)."""
        self._stop.set()
        self._thread.join(STOP_SECONDS if timeout is None else timeout)
        return not self._thread.is_alive()

    def received_ids(self) -> set[int]:
        with self._lock:
            return {item.id for run in self.sockets for item in run.received}

    def last_seen(self) -> int | None:
        """The id a socket is opened after: the last one received, else the newest read first."""
        with self._lock:
            received = [item.id for run in self.sockets for item in run.received]
        return received[-1] if received else self.started_after

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except (requests.RequestException, ValueError, KeyError) as exc:
                # (no answer, or one that is not what the gateway documents: tried again, as the
                # page tries a read of the newest id, or a ticket given up on, again)
                self.refused[f"request {type(exc).__name__}"] += 1
                wait = self._backoff(RECONNECT_MAX_SECONDS if self.started_after is None
                                     else RECONNECT_TURNED_AWAY_MAX_SECONDS)
            self._stop.wait(wait)

    def _step(self) -> float:
        """The page's next step: the newest id read (once), else a ticket asked for and its
        socket read until it ends; the seconds to wait before the next step."""
        token = self.shopper.session.token
        if self.started_after is None:
            answer = requests.get(f"{self.gateway}/api/notifications/newest",
                                  timeout=REQUEST_TIMEOUT,
                                  headers={"Authorization": f"Bearer {token}"})
            if answer.status_code == 200:
                self.started_after = int(answer.json()["id"])
                return 0.0
            kind, longest = "newest", RECONNECT_MAX_SECONDS
        else:
            answer = ask_for_a_ticket(self.gateway, token, REQUEST_TIMEOUT)
            if answer.status_code == 201:
                return self._stream(answer.json()["ticket"])
            # (as the page's noTicket: no socket tried, the next ticket asked for later)
            kind, longest = "ticket", RECONNECT_TURNED_AWAY_MAX_SECONDS
        self.refused[f"{kind} {answer.status_code}"] += 1
        if refused_as_expired(answer):
            return self._sign_in_again(token)
        return self._backoff(longest, retry_after(answer))

    def _sign_in_again(self, refused: str) -> float:
        """Its token `refused` as expired (a run longer than AUTH_TOKEN_TTL_SECONDS: the socket
        closed 1008 and every ticket refused 401 from then on), the shopper signed in again with
        their name and password, as the page's user does once it shows its sign-in form, unless
        the load's threads for them did already (ShopperSession); the seconds to wait before the
        next step (none once signed in)."""
        sign_in = self.shopper.session.sign_in_again(self.gateway, refused)
        if sign_in.made:
            self.signed_in_again += 1
        if sign_in.token is not None:
            return 0.0
        if sign_in.failed is not None:
            self.refused[f"sign-in {sign_in.failed}"] += 1
        return self._backoff(RECONNECT_MAX_SECONDS, sign_in.wait)

    def _backoff(self, longest: float, at_least: float = 0.0) -> float:
        """The page's wait before it reconnects (scheduleReconnect): the current delay, jittered
        by a quarter either way, and never less than `at_least`; the next twice it, up to
        `longest`."""
        wait = self._delay * self.rng.uniform(0.75, 1.25)
        self._delay = min(self._delay * 2, longest)
        return max(wait, at_least)

    def _stream(self, ticket: str) -> float:
        """A socket opened with `ticket` after the last id seen, read until it ends or the
        follower stops; the seconds to wait before the next ticket, as the page waits: from the
        shortest again once a socket has worked (stayed open SOCKET_WORKED_SECONDS, or was closed
        1012, its gateway process stopping), doubling up to RECONNECT_MAX_SECONDS, to
        RECONNECT_TURNED_AWAY_MAX_SECONDS for a socket turned away (its handshake refused, as with
        a 429, or closed 1013), and never sooner than a 1013's "try again in N s"."""
        if self._stop.is_set():  # (as the ticket was asked for)
            return 0.0
        run = SocketRun(after=self.last_seen())
        try:
            socket = WebSocketClient.connect(socket_url(self.gateway, ticket, run.after))
        except Exception as exc:  # (a handshake refused, 429, is no upgrade: ConnectionError)
            self.refused[f"handshake {type(exc).__name__}"] += 1
            return self._backoff(RECONNECT_TURNED_AWAY_MAX_SECONDS)
        with self._lock:
            self.sockets.append(run)
        opened, said = time.monotonic(), ""
        try:
            while not self._stop.is_set():
                frame = socket.receive(timeout=RECEIVE_SECONDS)
                if frame is None:
                    continue
                item = json.loads(frame)
                payload = item["payload"]
                with self._lock:
                    run.received.append(Delivery(int(item["id"]), payload["user_id"],
                                                 payload["order_id"], payload["status"]))
            run.ended = "stopped"
        except ConnectionClosed as closed:
            run.ended, said = closed.reason, closed.message or ""
        except Exception as exc:  # (its connection reset, say)
            run.ended = type(exc).__name__
        try:
            socket.close()  # (and its reader thread ended)
        except (ConnectionClosed, OSError):
            pass
        if run.ended == 1012 or time.monotonic() - opened >= SOCKET_WORKED_SECONDS:
            self._delay = RECONNECT_FIRST_SECONDS
        if run.ended != 1013:
            return self._backoff(RECONNECT_MAX_SECONDS)
        try_again_in = TRY_AGAIN_IN.search(said)
        return self._backoff(RECONNECT_TURNED_AWAY_MAX_SECONDS,
                             float(try_again_in[1]) if try_again_in else 0.0)


@dataclass
class Followers:
    """The run's followers, one a shopper followed: following from the block's start (or
    start()) to its end (or stop())."""

    followers: list[NotificationFollower]
    # When the first stop() stops waiting (time.monotonic()'s): a stop after it (the block's end
    # after sockets_caught_up's) waits no longer than that, not STOP_SECONDS more.
    _stop_deadline: float | None = field(default=None, init=False)

    @classmethod
    def of(cls, gateway_url: str, shoppers: list[Shopper], seed: int) -> Followers:
        return cls([NotificationFollower(gateway_url, shopper, random.Random(f"socket-{seed}-{n}"))
                    for n, shopper in enumerate(shoppers)])

    def __enter__(self) -> Followers:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> Followers:
        for follower in self.followers:
            follower.start()
        return self

    def stop(self) -> list[str]:
        """Stop every follower (again: a no-op), each socket closed; the users whose follower has
        not stopped within STOP_SECONDS of the first stop (held in a request or a handshake past
        their timeouts: left running, a daemon thread, what its sockets sent read as it stands)."""
        for follower in self.followers:
            follower._stop.set()
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_SECONDS
        return [follower.user_id for follower in self.followers
                if not follower.stop(max(0.0, self._stop_deadline - time.monotonic()))]

    def counts(self) -> Counter[str]:
        """The sockets opened, how they ended, what gave none, and the sign-ins made again (a
        token expired), for the report."""
        counted: Counter[str] = Counter()
        for follower in self.followers:
            counted["opened"] += len(follower.sockets)
            counted["received"] += len(follower.received_ids())
            if follower.signed_in_again:
                counted["signed in again"] += follower.signed_in_again
            counted.update(f"ended {run.ended}" for run in follower.sockets)
            counted.update(follower.refused)
        return counted
