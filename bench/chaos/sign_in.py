"""A shopper's token as it is now, shared by all that acts for them (the load's threads, their
notification follower), and their signing in again once the gateway refuses it as expired (a run
longer than AUTH_TOKEN_TTL_SECONDS): once per expiry, however many threads meet it at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import requests

# The one refusal a token gets for its life having ended (gateway_app/auth.py, for every route
# behind its bearer check, and a socket's ticket). Its others are no expiry: INVALID_TOKEN (not
# one the gateway issued) and TOKEN_SIGNED_OUT (nobody signs the soak's shoppers out) would be
# the shop's fault, to be seen as refusals, not hidden by a sign-in.
TOKEN_EXPIRED = "TOKEN_EXPIRED"
REQUEST_TIMEOUT = 10
# After a sign-in failed (the gateway down, its database or Redis gone, a 429), the next one waits
# this long, doubling up to the longest, and no less than the failure's Retry-After: whichever of
# the shopper's threads asks next.
FIRST_PAUSE_SECONDS = 0.5
LONGEST_PAUSE_SECONDS = 10.0


def error_code(answer: requests.Response) -> str | None:
    """The shop's error code in an error answer's body (shared.errors), if it has one."""
    try:
        return answer.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def refused_as_expired(answer: requests.Response | None) -> bool:
    """Whether the gateway refused a request for its token having expired: a 401 its bearer check
    gave before the request went any further (nothing was forwarded to a service), so the same
    request may be sent again once signed in."""
    return (answer is not None and answer.status_code == 401
            and error_code(answer) == TOKEN_EXPIRED)


@dataclass(frozen=True)
class SignIn:
    """What asking for a token to use instead of a refused one gave: the token (None: none for
    now), whether this ask signed in (not merely found another's sign-in made since), the
    sign-in's failure (its status, or the name of the exception that stood for one; None when no
    sign-in was tried) and how long to wait before asking again."""

    token: str | None
    made: bool = False
    failed: int | str | None = None
    wait: float = 0.0


class ShopperSession:
    """One shopper's current token: the one they registered with, then each sign-in's."""

    def __init__(self, username: str, password: str, token: str):
        self.username, self.password = username, password
        self._token = token
        self._lock = threading.Lock()
        self._pause = FIRST_PAUSE_SECONDS
        self._not_before = 0.0  # (time.monotonic()'s: the next sign-in, after one failed)

    @property
    def token(self) -> str:
        return self._token

    def sign_in_again(self, gateway_url: str, refused: str) -> SignIn:
        """A token to use instead of `refused`: the current one if a sign-in replaced it already
        (another thread met the expiry first), else a new sign-in's, with the shopper's username
        and password, as the page's user signs in again. One sign-in at a time: those who ask
        meanwhile wait for it, and take its token. Failed, it is not tried again before its pause
        is over (SignIn.wait): the caller waits, within its own patience, and asks again."""
        with self._lock:
            if self._token != refused:
                return SignIn(self._token)
            wait = self._not_before - time.monotonic()
            if wait > 0:
                return SignIn(None, wait=wait)
            try:
                answer = requests.post(f"{gateway_url}/api/auth/login", timeout=REQUEST_TIMEOUT,
                                       json={"username": self.username,
                                             "password": self.password})
                status: int | str = answer.status_code
                if status == 200:
                    self._token = answer.json()["access_token"]
                    self._pause, self._not_before = FIRST_PAUSE_SECONDS, 0.0
                    return SignIn(self._token, made=True)
                wait = max(self._pause, retry_after(answer))
            except (requests.RequestException, ValueError, KeyError) as exc:
                status, wait = type(exc).__name__, self._pause
            self._pause = min(self._pause * 2, LONGEST_PAUSE_SECONDS)
            self._not_before = time.monotonic() + wait
            return SignIn(None, failed=status, wait=wait)


def retry_after(answer: requests.Response) -> float:
    """The seconds an answer's Retry-After asks to wait (0 for none)."""
    try:
        return float(answer.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0
