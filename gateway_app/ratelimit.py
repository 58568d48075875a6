"""Per-caller rate limiting in Redis: a fixed one-minute window per user (or per address for
/api/auth: signing up, in and out), and per username for signing in. Past the limit the caller
gets a 429 with Retry-After; with Redis down nobody is limited."""

from __future__ import annotations

import logging
import math
import time

import redis

from shared.documented_errors import DocumentedError
from shared.errors import ApiError

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60

RATE_LIMITED = DocumentedError(
    429, "RATE_LIMITED", "too many requests this minute: the user's, or, signing up, in or out, "
    "the address's, or attempts to sign in under the username",
    retry_after=True)


class RateLimited(ApiError):
    status = 429
    code = "RATE_LIMITED"

    def __init__(self, retry_after: int):
        super().__init__(f"Too many requests; try again in {retry_after} s.",
                         details={"retry_after": retry_after},
                         headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, redis_url: str, limit_per_window: int, key_prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._limit = limit_per_window
        self._key_prefix = key_prefix

    def check(self, subject: str, now: float | None = None, limit: int | None = None) -> None:
        """Count one request by `subject`; raise RateLimited when it is over the limit (`limit`
        requests a window, or the limiter's own)."""
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        key = f"{self._key_prefix}:ratelimit:{subject}:{window}"
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, WINDOW_SECONDS + 1)
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, letting %s through: %s", subject, exc)
            return
        if count > (self._limit if limit is None else limit):
            raise RateLimited(max(1, math.ceil((window + 1) * WINDOW_SECONDS - now)))
