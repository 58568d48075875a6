"""A client of the gateway as a browser would use it: sign up, call /api with the bearer token,
and listen to live notifications over the WebSocket."""

from __future__ import annotations

import json
import uuid

import requests

from bench.notification_socket import ask_for_a_ticket, socket_url
from bench.websocket_client import WebSocketClient
from tests.polling import wait_for


class GatewayClient:
    def __init__(self, gateway_url: str, username: str | None = None):
        self.url = gateway_url
        self.username = username or f"shopper-{uuid.uuid4().hex[:10]}"
        self.http = requests.Session()
        body = self._json(self.http.post(f"{self.url}/api/auth/register", timeout=10, json={
            "username": self.username, "password": "a long password"}), 201)
        self.user_id, self.token = body["user_id"], body["access_token"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def api(self, method: str, path: str, status: int, **kwargs) -> dict:
        return self._json(self.http.request(method, f"{self.url}/api{path}", timeout=10,
                                            **kwargs), status)

    def open_account_with(self, amount) -> None:
        self.api("POST", "/accounts", 201)
        self.api("POST", "/accounts/deposit", 200, json={"amount": amount})

    def place_order(self, amount, **kwargs) -> dict:
        return self.api("POST", "/orders", 202, json={"amount": amount}, **kwargs)

    def wait_until_final(self, order_id: str, timeout: float = 10.0) -> dict:
        return wait_for(lambda: (o := self.api("GET", f"/orders/{order_id}", 200))["status"]
                        != "NEW" and o, timeout=timeout, what=f"order {order_id} to settle")

    def listen(self, after: int | None = None, gateway_url: str | None = None,
               by_token: bool = False) -> "Listener":
        """A notification socket on `gateway_url` (the client's own by default), opened as the
        page opens it, with a ticket asked of the client's own gateway (any instance takes it);
        `by_token`: with the token in its URL, as clients of before open it."""
        if by_token:
            base = (gateway_url or self.url).replace("http://", "ws://", 1)
            url = f"{base}/api/notifications/ws?access_token={self.token}"
            url += "" if after is None else f"&after={after}"
        else:
            ticket = self._json(ask_for_a_ticket(self.url, self.token), 201)["ticket"]
            url = socket_url(gateway_url or self.url, ticket, after)
        return Listener(WebSocketClient.connect(url))

    @staticmethod
    def _json(response: requests.Response, status: int) -> dict:
        assert response.status_code == status, (response.status_code, response.text)
        return response.json()


class Listener:
    """An open notifications WebSocket."""

    def __init__(self, socket):
        self.socket = socket

    def next(self, timeout: float = 10.0) -> dict | None:
        frame = self.socket.receive(timeout=timeout)
        return None if frame is None else json.loads(frame)

    def next_for(self, order_id: str, timeout: float = 10.0) -> dict:
        """The next notification about `order_id`, skipping others."""
        while True:
            item = self.next(timeout)
            assert item is not None, f"no notification about {order_id} within {timeout}s"
            if item["payload"]["order_id"] == order_id:
                return item

    def close(self) -> None:
        self.socket.close()
