"""A small client for the shop's HTTP APIs, so end-to-end tests read like the user story."""

from __future__ import annotations

import uuid

import requests

from tests.environment import TEST_SECRETS
from tests.polling import wait_for
from tests.signed_requests import SignedWithADeadline

FINAL_STATUSES = ("FINISHED", "CANCELLED")


class ShopClient:
    def __init__(self, orders_url: str, payments_url: str, user_id: str | None = None,
                 internal_auth_secret: str = TEST_SECRETS["INTERNAL_AUTH_SECRET"]):
        self.orders_url = orders_url
        self.payments_url = payments_url
        self.user_id = user_id or f"shopper-{uuid.uuid4().hex[:12]}"
        self.http = requests.Session()
        self.http.auth = SignedWithADeadline(self.user_id, internal_auth_secret)

    def open_account(self) -> dict:
        return self._ok(self.http.post(f"{self.payments_url}/accounts", timeout=10), 201)

    def deposit(self, amount, key: str | None = None) -> dict:
        headers = {"Idempotency-Key": key} if key else {}
        return self._ok(self.http.post(f"{self.payments_url}/accounts/deposit",
                                       json={"amount": amount}, headers=headers, timeout=10), 200)

    def balance(self) -> str:
        return self._ok(self.http.get(f"{self.payments_url}/accounts/balance", timeout=10),
                        200)["balance"]

    def place_order(self, amount, description: str = "") -> dict:
        return self._ok(self._post_order(amount, description), 202)

    def place_order_until_taken(self, amount, key: str, timeout: float = 30.0
                                ) -> tuple[dict, list[str]]:
        """Place an order as a careful client does: asked again with the same Idempotency-Key
        while the service answers 503 (its database away a moment) or cannot be reached, until
        it is taken (202). Returns the order, and what each refused try was told."""
        refusals: list[str] = []

        def taken() -> dict | None:
            try:
                response = self._post_order(amount, "", key)
            except requests.ConnectionError as exc:
                refusals.append(type(exc).__name__)
                return None
            if response.status_code == 503:
                refusals.append(response.json()["error"]["code"])
                return None
            return self._ok(response, 202)

        order = wait_for(taken, timeout=timeout, interval=0.1,
                         what=f"the order of key {key} to be taken")
        return order, refusals

    def _post_order(self, amount, description: str, key: str | None = None) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post(f"{self.orders_url}/orders", headers=headers, timeout=10,
                              json={"amount": amount, "description": description})

    def order(self, order_id: str) -> dict:
        return self._ok(self.http.get(f"{self.orders_url}/orders/{order_id}", timeout=10), 200)

    def wait_until_final(self, order_id: str, timeout: float = 10.0) -> dict:
        return wait_for(lambda: (o := self.order(order_id))["status"] in FINAL_STATUSES and o,
                        timeout=timeout, what=f"order {order_id} to reach a final status")

    @staticmethod
    def _ok(response: requests.Response, status: int) -> dict:
        assert response.status_code == status, (response.status_code, response.text)
        return response.json()
