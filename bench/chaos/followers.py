"""Shoppers who keep the gateway's notification socket open for the whole run, as the web page does
(gateway_app/web/app.js): the newest notification's id read first, then a socket opened with a
ticket of its own, `after` the last id seen; after each close (1011 as the gateway loses Redis, a
gunicorn child killed under it, a ticket lost with Redis's keys), a new ticket and a new socket,
after the page's backoff (0.5 s doubling to 10 s, jittered, never sooner than a Retry-After), so
that what it missed while away is sent first; its token expired (a run longer than
AUTH_TOKEN_TTL_SECONDS: the socket closed 1008, the tickets refused 401), the shopper signed in
again. What each socket sent is kept, for the invariant (invariants.socket_deliveries)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests
from simple_websocket import ConnectionClosed

from bench.chaos.load import Shopper
from bench.notification_socket import ask_for_a_ticket, socket_url
from bench.websocket_client import WebSocketClient

RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
# A socket that stayed open this long worked: the next reconnect waits the shortest again.
SOCKET_WORKED_SECONDS = 5.0
# How long a follower waits for each frame before it looks whether it is to stop.
RECEIVE_SECONDS = 0.5
REQUEST_TIMEOUT = 10


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
        # The shopper's token: the one they registered with, then each sign-in's.
        self.token = shopper.token
        self.signed_in_again = 0
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

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def received_ids(self) -> set[int]:
        with self._lock:
            return {item.id for run in self.sockets for item in run.received}

    def last_seen(self) -> int | None:
        """The id a socket is opened after: the last one received, else the newest read first."""
        with self._lock:
            received = [item.id for run in self.sockets for item in run.received]
        return received[-1] if received else self.started_after

    def _follow(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._stop.is_set():
            wait_at_least, worked = 0.0, False
            try:
                if self.started_after is None:
                    answer = self._request("GET", "/notifications/newest")
                    if answer.status_code == 200:
                        self.started_after = int(answer.json()["id"])
                        continue
                    wait_at_least = self._refused(f"newest {answer.status_code}", answer)
                else:
                    answer = ask_for_a_ticket(self.gateway, self.token, REQUEST_TIMEOUT)
                    if answer.status_code == 201:
                        worked = self._stream(answer.json()["ticket"])
                    elif answer.status_code == 401:
                        self.refused["ticket 401"] += 1
                        if self._signed_in_again():
                            continue
                    else:
                        wait_at_least = self._refused(f"ticket {answer.status_code}", answer)
            except (requests.RequestException, ValueError, KeyError) as exc:
                # (no answer, or one that is not what the gateway documents: tried again)
                self.refused[f"request {type(exc).__name__}"] += 1
            delay = RECONNECT_FIRST_SECONDS if worked else min(delay * 2, RECONNECT_MAX_SECONDS)
            self._stop.wait(max(wait_at_least, delay * self.rng.uniform(0.5, 1.0)))

    def _refused(self, kind: str, answer: requests.Response) -> float:
        """Count the refusal; the seconds its Retry-After asks to wait (0 for none)."""
        self.refused[kind] += 1
        try:
            return float(answer.headers.get("Retry-After", 0))
        except ValueError:
            return 0.0

    def _request(self, method: str, path: str) -> requests.Response:
        return requests.request(method, f"{self.gateway}/api{path}", timeout=REQUEST_TIMEOUT,
                                headers={"Authorization": f"Bearer {self.token}"})

    def _signed_in_again(self) -> bool:
        """Its token refused (expired: a run longer than AUTH_TOKEN_TTL_SECONDS, the socket closed
        1008 and every ticket refused 401 from then on), the shopper signed in again with their
        name and password, as the page's user does once it shows its sign-in form; whether it
        worked (a new token kept)."""
        answer = requests.post(f"{self.gateway}/api/auth/login", timeout=REQUEST_TIMEOUT,
                               json={"username": self.shopper.username,
                                     "password": self.shopper.password})
        if answer.status_code != 200:
            self.refused[f"sign-in {answer.status_code}"] += 1
            return False
        self.token = answer.json()["access_token"]
        self.signed_in_again += 1
        return True

    def _stream(self, ticket: str) -> bool:
        """A socket opened with `ticket` after the last id seen, read until it ends or the
        follower stops; whether it worked (stayed open SOCKET_WORKED_SECONDS, or was closed 1012,
        its gateway process stopping, as the page reconnects at once then)."""
        run = SocketRun(after=self.last_seen())
        try:
            socket = WebSocketClient.connect(socket_url(self.gateway, ticket, run.after))
        except Exception as exc:  # (a handshake refused, 429, is no upgrade: ConnectionError)
            self.refused[f"handshake {type(exc).__name__}"] += 1
            return False
        with self._lock:
            self.sockets.append(run)
        opened = time.monotonic()
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
            run.ended = closed.reason
        except Exception as exc:  # (its connection reset, say)
            run.ended = type(exc).__name__
        try:
            socket.close()  # (and its reader thread ended)
        except (ConnectionClosed, OSError):
            pass
        return run.ended == 1012 or time.monotonic() - opened >= SOCKET_WORKED_SECONDS


@dataclass
class Followers:
    """The run's followers, one a shopper followed: following from the block's start (or
    start()) to its end (or stop())."""

    followers: list[NotificationFollower]

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

    def stop(self) -> None:
        """Stop every follower (again: a no-op), each socket closed."""
        for follower in self.followers:
            follower._stop.set()
        for follower in self.followers:
            follower.stop()

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
