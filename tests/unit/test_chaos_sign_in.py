"""The chaos soak's shoppers signing in again (bench/chaos/sign_in.py, and the load's requests
through the gateway, bench/chaos/load.py): once per expiry however many threads meet it, the
request refused sent again as it was, a sign-in failing waited on within the request's patience,
and no other refusal taken for an expiry."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from bench.chaos import sign_in
from bench.chaos.load import Ledger, Load, Shopper
from bench.chaos.sign_in import SignIn

GATEWAY = "http://gateway.invalid"
USERNAME, PASSWORD = "shopper-u1", "a long password"


def _answer(status: int, body: dict, headers: dict | None = None) -> requests.Response:
    answer = requests.Response()
    answer.status_code, answer._content = status, json.dumps(body).encode()
    answer.headers.update(headers or {})
    return answer


def _refused(code: str) -> requests.Response:
    return _answer(401, {"error": {"code": code, "message": "", "details": {}}})


class FakeGateway:
    """requests.post as the gateway answers the load: POST /api/auth/login with the shopper's name
    and password gives a new token (or the next of `sign_in_failures`: a status, or an exception
    raised), each held for `sign_in_seconds`; any other path is answered 202 for a token given
    since the registered one, else as `refusal` (a token expired). Keeps every request sent."""

    def __init__(self, refusal: requests.Response | None = None, sign_in_failures=(),
                 sign_in_seconds: float = 0.0):
        self.refusal = _refused("TOKEN_EXPIRED") if refusal is None else refusal
        self.sign_in_failures = list(sign_in_failures)
        self.sign_in_seconds = sign_in_seconds
        self.sent: list[tuple[str, dict | None, dict]] = []
        self.tokens: list[str] = []
        self._lock = threading.Lock()

    def post(self, url: str, json=None, headers=None, timeout=None, **_options):
        path = url.removeprefix(GATEWAY)
        with self._lock:
            self.sent.append((path, json, dict(headers or {})))
        if path == "/api/auth/login":
            assert json == {"username": USERNAME, "password": PASSWORD}
            time.sleep(self.sign_in_seconds)  # (other threads meet the expiry meanwhile)
            with self._lock:
                failure = self.sign_in_failures.pop(0) if self.sign_in_failures else None
                if failure is None:
                    self.tokens.append(f"token-{len(self.tokens) + 2}")
                    return _answer(200, {"access_token": self.tokens[-1]})
            if isinstance(failure, Exception):
                raise failure
            return _answer(failure, {}, {"Retry-After": "0"})
        signed_in = headers.get("Authorization", "").removeprefix("Bearer ") in self.tokens
        return _answer(202, {"id": "A"}) if signed_in else self.refusal

    def sign_ins(self) -> int:
        return sum(path == "/api/auth/login" for path, _, _ in self.sent)


@pytest.fixture
def shopper() -> Shopper:
    return Shopper("u1", "token", USERNAME, PASSWORD)


def _load(gateway: FakeGateway, monkeypatch) -> Load:
    """A Load without a stack, its requests answered by `gateway`."""
    monkeypatch.setattr(requests, "post", gateway.post)
    shop = Load.__new__(Load)
    shop.gateway, shop.ledger = GATEWAY, Ledger()
    return shop


def test_many_threads_meeting_one_expiry_sign_the_shopper_in_once(shopper, monkeypatch):
    gateway = FakeGateway(sign_in_seconds=0.2)
    monkeypatch.setattr(requests, "post", gateway.post)
    together = threading.Barrier(8)
    signed_in: list[SignIn] = []

    def meet_the_expiry():
        together.wait()
        signed_in.append(shopper.session.sign_in_again(GATEWAY, "token"))
    threads = [threading.Thread(target=meet_the_expiry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert gateway.sign_ins() == 1
    assert {one.token for one in signed_in} == {"token-2"} and shopper.session.token == "token-2"
    assert sum(one.made for one in signed_in) == 1


def test_a_token_refused_after_another_sign_in_replaced_it_signs_in_no_more(shopper,
                                                                          monkeypatch):
    """(A follower's token refused, say, after the load's threads signed the shopper in: the
    token is one for them all.)"""
    gateway = FakeGateway()
    monkeypatch.setattr(requests, "post", gateway.post)
    assert shopper.session.sign_in_again(GATEWAY, "token") == SignIn("token-2", made=True)
    assert shopper.session.sign_in_again(GATEWAY, "token") == SignIn("token-2")
    # The new one expired in its turn: signed in again.
    assert shopper.session.sign_in_again(GATEWAY, "token-2") == SignIn("token-3", made=True)
    assert gateway.sign_ins() == 2


def test_a_sign_in_failed_is_not_tried_again_before_its_pause_is_over(monkeypatch):
    monkeypatch.setattr(sign_in, "FIRST_PAUSE_SECONDS", 0.3)
    shopper = Shopper("u1", "token", USERNAME, PASSWORD)  # (its session's pause shortened)
    gateway = FakeGateway(sign_in_failures=[503])
    monkeypatch.setattr(requests, "post", gateway.post)
    failed = shopper.session.sign_in_again(GATEWAY, "token")
    assert (failed.token, failed.failed, failed.wait) == (None, 503, 0.3)
    waiting = shopper.session.sign_in_again(GATEWAY, "token")
    assert (waiting.token, waiting.failed) == (None, None) and 0 < waiting.wait <= 0.3
    assert gateway.sign_ins() == 1
    time.sleep(waiting.wait)  # (the pause it named)
    assert shopper.session.sign_in_again(GATEWAY, "token").token == "token-2"


def test_a_gateway_request_refused_as_expired_is_sent_again_as_it_was_once_signed_in(
        shopper, monkeypatch):
    gateway = FakeGateway()
    shop = _load(gateway, monkeypatch)
    body = {"amount": "5.00", "description": "tag-1"}
    status, answer = shop._post(shopper, "gateway", "/orders", body, "key-1",
                                time.monotonic() + 5)
    assert status == 202
    (first, _, refused), (login, _, _), (again, sent_again, signed_in) = gateway.sent
    assert (first, login, again) == ("/api/orders", "/api/auth/login", "/api/orders")
    assert refused == {"Idempotency-Key": "key-1", "Authorization": "Bearer token"}
    assert signed_in == {"Idempotency-Key": "key-1", "Authorization": "Bearer token-2"}
    assert sent_again == body
    assert shop.ledger.answers == {"sign-in again: made": 1}


def test_threads_of_one_shopper_refused_as_expired_sign_in_once_and_are_all_answered(
        shopper, monkeypatch):
    gateway = FakeGateway(sign_in_seconds=0.2)
    shop = _load(gateway, monkeypatch)
    together = threading.Barrier(6)
    statuses = []

    def order(n: int):
        together.wait()
        statuses.append(shop._post(shopper, "gateway", "/orders", {"description": f"tag-{n}"},
                                   None, time.monotonic() + 5)[0])
    threads = [threading.Thread(target=order, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert statuses == [202] * 6
    assert gateway.sign_ins() == 1 and shop.ledger.answers == {"sign-in again: made": 1}


def test_a_sign_in_failing_is_tried_again_within_the_requests_patience(monkeypatch):
    """The gateway down as the token expired (its gunicorn child killed, say), then its database:
    the shopper signs in once it answers, and the request goes through."""
    monkeypatch.setattr(sign_in, "FIRST_PAUSE_SECONDS", 0.01)
    shopper = Shopper("u1", "token", USERNAME, PASSWORD)  # (its session's pause shortened)
    gateway = FakeGateway(sign_in_failures=[requests.ConnectionError(), 503])
    shop = _load(gateway, monkeypatch)
    status, _ = shop._post(shopper, "gateway", "/accounts/deposit", {"amount": "1.00"}, "key-1",
                           time.monotonic() + 5)
    assert status == 202 and gateway.sign_ins() == 3
    assert shop.ledger.answers == {"sign-in again: failed ConnectionError": 1,
                                   "sign-in again: failed 503": 1, "sign-in again: made": 1}


def test_a_sign_in_failing_past_the_requests_patience_leaves_the_refusal_its_answer(
        monkeypatch):
    monkeypatch.setattr(sign_in, "FIRST_PAUSE_SECONDS", 0.05)
    shopper = Shopper("u1", "token", USERNAME, PASSWORD)  # (its session's pause shortened)
    gateway = FakeGateway(sign_in_failures=[503] * 100)
    shop = _load(gateway, monkeypatch)
    started = time.monotonic()
    status, answer = shop._post(shopper, "gateway", "/orders", {}, "key-1", started + 0.5)
    assert time.monotonic() - started < 0.5 + 0.5
    assert (status, sign_in.error_code(answer)) == (401, "TOKEN_EXPIRED")
    assert shopper.session.token == "token"
    assert 2 <= shop.ledger.answers["sign-in again: failed 503"] < 10


@pytest.mark.parametrize("code", ["INVALID_TOKEN", "TOKEN_SIGNED_OUT", "MISSING_TOKEN"])
def test_a_refusal_other_than_an_expiry_signs_nobody_in(code, shopper, monkeypatch):
    """Only an expiry is a token's life ended: another refusal would be the shop's fault (the
    soak's tokens are all the gateway's, and nobody signs them out), to be seen, not hidden."""
    gateway = FakeGateway(refusal=_refused(code))
    shop = _load(gateway, monkeypatch)
    status, answer = shop._post(shopper, "gateway", "/orders", {}, "key-1", time.monotonic() + 5)
    assert (status, sign_in.error_code(answer)) == (401, code)
    assert gateway.sign_ins() == 0 and shop.ledger.answers == {}


def test_a_request_straight_to_a_service_is_never_taken_for_an_expiry(shopper, monkeypatch):
    """(A service's 401 is its refusal of the gateway's signature, never of a token.)"""
    gateway = FakeGateway()
    shop = _load(gateway, monkeypatch)
    shop.stack, shop.secret = SimpleNamespace(orders_url=GATEWAY), "secret"
    status, _ = shop._post(shopper, "orders-api", "/orders", {}, "key-1", time.monotonic() + 5)
    assert status == 401 and gateway.sign_ins() == 0


class ExpiredAtOnce(FakeGateway):
    """A gateway whose tokens expire as soon as they are issued (a life rounded down to nothing):
    every sign-in made, every request refused as expired."""

    def post(self, url: str, json=None, headers=None, timeout=None, **_options):
        answer = super().post(url, json=json, headers=headers, timeout=timeout)
        return answer if url.endswith("/api/auth/login") else self.refusal


def test_sign_ins_made_but_refused_at_once_keep_a_request_no_longer_than_its_patience(
        shopper, monkeypatch):
    gateway = ExpiredAtOnce()
    shop = _load(gateway, monkeypatch)
    started = time.monotonic()
    status, answer = shop._post(shopper, "gateway", "/orders", {}, "key-1", started + 0.3)
    assert (status, sign_in.error_code(answer)) == (401, "TOKEN_EXPIRED")
    assert time.monotonic() - started < 2
    assert gateway.sign_ins() >= 1
