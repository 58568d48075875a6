"""Per-caller rate limiting in Redis: a fixed one-minute window per user (or per address for
/api/auth: signing up, in and out), per username and address for signing in, and per username for
failed sign-ins. Past the limit the caller gets a 429 with Retry-After; with Redis down nobody is
limited."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Iterator

import redis
from flask import request

from shared.config import REDIS_KEY_SEPARATOR
from shared.documented_errors import RETRY_AFTER, DocumentedError
from shared.errors import ApiError

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60

RATE_LIMITED = DocumentedError(
    429, "RATE_LIMITED", "too many requests this minute: the user's, or, signing up, in or out, "
    "the address's, or attempts to sign in under the username from the address, or failed "
    "attempts to sign in under the username from any address",
    headers=(RETRY_AFTER,))


class RateLimited(ApiError):
    status = 429
    code = "RATE_LIMITED"

    def __init__(self, retry_after: int):
        super().__init__(f"Too many requests; try again in {retry_after} s.",
                         details={"retry_after": retry_after},
                         headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


def address_subject(address: str | None) -> str:
    """A client's address as the limits count it: an IPv4 address whole (written as one, or
    mapped into IPv6 by a dual-stack socket), an IPv6 one by its /64, the smallest block one
    subscriber is given and can take any address of (counted whole, a client would have as many
    limits as it cares to take addresses). A port a proxy wrote after it (`1.2.3.4:5678`,
    `[2001:db8::1]:5678`: each connection's, else a limit of its own) is left out, and so are
    the brackets of an IPv6 address written in them without one (`[2001:db8::1]`, as RFC 7239's
    `Forwarded` writes it and some proxies their X-Forwarded-For: else counted whole)."""
    text = str(address or "")
    host, colon, port = text.rpartition(":")
    if text.startswith("[") and text.endswith("]"):  # [IPv6]
        text = text[1:-1]
    elif host.startswith("[") and host.endswith("]"):  # [IPv6]:port
        text = host[1:-1]
    elif colon and port.isdigit() and host.count(":") == 0:  # IPv4:port
        text = host
    try:
        ip = ipaddress.ip_address(text)  # (an IPv6 zone, fe80::1%eth0, is dropped by the /64)
    except ValueError:
        return text
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address() -> str:
    """The request's client address as the limits count it (address_subject): the address its
    connection comes from, or the one our trusted proxies forwarded (GATEWAY_TRUSTED_PROXY_HOPS:
    ProxyFix has written it in before the app sees the request)."""
    return address_subject(request.remote_addr)


class RateLimiter:
    """Counts per subject in fixed windows: `check` counts a request and refuses it past the
    limit; `failure_reserved` counts a failure before its outcome is known and takes it back if
    it turns out not to be one (a sign-in whose password was right)."""

    def __init__(self, redis_url: str, limit_per_window: int, key_prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._limit = limit_per_window
        self._key_prefix = key_prefix

    def close(self) -> None:
        self._client.close()

    def check(self, subject: str, now: float | None = None, limit: int | None = None) -> bool:
        """Count one request by `subject`; raise RateLimited when it is over the limit (`limit`
        requests a window, or the limiter's own). Whether it was counted (not with Redis away:
        then nothing is to be given back)."""
        now = time.time() if now is None else now
        count = self._add(subject, now, 1, unavailable="letting %s through")
        if count is not None and count > (self._limit if limit is None else limit):
            raise RateLimited(_retry_after(now))
        return count is not None

    def wait_when_spent(self, subject: str, limit: int, now: float | None = None) -> int | None:
        """Without counting anything: the seconds until `subject` may be counted again if it has
        had its `limit` this window already, else None (and with Redis away, which lets it
        through). A request that leads to another one counted (a socket's ticket, its handshake)
        can be refused, with the wait, where the other's refusal would not be read."""
        now = time.time() if now is None else now
        try:
            count = self._client.get(self._key(subject, now))
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, not asked about %s: %s", subject, exc)
            return None
        return _retry_after(now) if int(count or 0) >= limit else None

    @contextlib.contextmanager
    def failure_reserved(self, subject: str, limit: int | None = None
                         ) -> Iterator[ReservedFailure]:
        """Count a failure by `subject` as the block begins (RateLimited, past `limit`, before it
        runs), and give it back as the block ends unless the block `confirm`ed it a failure: so
        it is given back for an attempt found right, and for one never found wrong (the block
        raised, a database error say). Counted as failed before the outcome is known, attempts
        under way at once are counted as they begin, and a burst of them gets no more verdicts
        than the cap (counted once failed, each would have found the count as it was)."""
        began = time.time()
        counted = self.check(subject, now=began, limit=limit)
        failure = ReservedFailure()
        try:
            yield failure
        finally:
            if counted and not failure.confirmed:  # (Redis away as it counted: nothing to give)
                self.give_back(subject, began)

    def give_back(self, subject: str, counted_at: float) -> None:
        """Take back one request of `subject` counted (`check`) at `counted_at`: in the window it
        was counted in, whichever window it is now."""
        self._add(subject, counted_at, -1, unavailable="%s not given back")

    def _add(self, subject: str, now: float, amount: int, unavailable: str) -> int | None:
        """Add `amount` to the count of `subject` in the window of `now`, its key expiring with
        the window: the count it makes (None with Redis down, said as `unavailable` says, its %s
        the subject)."""
        key = self._key(subject, now)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incrby(key, amount)
            pipe.expire(key, WINDOW_SECONDS + 1)
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, " + unavailable + ": %s", subject, exc)
            return None
        return count

    def _key(self, subject: str, now: float) -> str:
        return (f"{self._key_prefix}{REDIS_KEY_SEPARATOR}ratelimit:{subject}:"
                f"{int(now // WINDOW_SECONDS)}")


class ReservedFailure:
    """A failure counted before its outcome is known (RateLimiter.failure_reserved): given back
    as its block ends unless `confirm`ed."""

    confirmed = False

    def confirm(self) -> None:
        """It failed: the count stays."""
        self.confirmed = True


def _retry_after(now: float) -> int:
    """Seconds until the window `now` is in ends (1 at least)."""
    return max(1, math.ceil((int(now // WINDOW_SECONDS) + 1) * WINDOW_SECONDS - now))
