"""A gateway signature that vouches for a write without an Idempotency-Key is accepted once: a
captured order or deposit sent again within its signature's window (shared.internal_auth) is
refused 401 UNTRUSTED_IDENTITY, as a signature that is not the gateway's is, where it was carried
out again.

Only there: a read changes nothing, a keyed write's repeat is answered with its first answer
(shared.idempotency) and the gateway sends again only those two (gateway_app/upstream_http.py; a
gRPC call only when grpc-core knows the service never saw it), and opening an account twice is a
409. So the check costs one Redis round trip per unkeyed write, and none elsewhere. Each use is
noted (SET NX, a digest of the signature) before the work, and kept for as long as the signature
could be accepted. A signature is for one request at one moment: the gateway's deadline, to the
microsecond (shared.caller_deadline), differs between two requests it sends, so a user's two
orders alike, sent one after the other, are two signatures (a caller that signs no deadline signs
two alike within a second as one).

Redis unreachable (or too slow, past 0.25 s), the write goes through, logged at WARNING: a shop
takes orders with Redis down, as it reads without the cache, and meanwhile a captured unkeyed
write can be repeated within its window, as before this check. So can one whose note Redis lost
(a restart without its appendonly file, a failover).
"""

from __future__ import annotations

import hashlib
import logging

import redis
from flask import current_app, g

from shared.errors import Unauthorized
from shared.internal_auth import InvalidIdentity, MAX_AGE_SECONDS, MAX_AHEAD_SECONDS

log = logging.getLogger(__name__)

SINGLE_USE_SIGNATURES_EXTENSION = "hseshop.single_use_signatures"
# How long a use is kept: the longest a signature is accepted after it is first used (its
# timestamp up to MAX_AHEAD_SECONDS ahead then, and accepted MAX_AGE_SECONDS after it), with as much
# again for the clocks of the service's hosts, which may each read the timestamp.
_KEPT_SECONDS = MAX_AGE_SECONDS + 2 * MAX_AHEAD_SECONDS + 1
# Where shared.identity leaves the signature of the call under way, once verified.
_VERIFIED_SIGNATURE = "hseshop_verified_signature"


class SingleUseSignatures:
    """The signatures used for unkeyed writes, in Redis under `prefix`."""

    def __init__(self, redis_url: str, prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._prefix = prefix

    def close(self) -> None:
        self._client.close()

    def first_use(self, signature: str) -> bool:
        """Note a use of `signature`: False when it was used before; True the first time, and
        when Redis cannot tell (logged)."""
        digest = hashlib.sha256(signature.encode("utf-8", "replace")).hexdigest()
        try:
            return bool(self._client.set(f"{self._prefix}:signature-used:{digest}", 1, nx=True,
                                         ex=_KEPT_SECONDS))
        except redis.RedisError as exc:
            log.warning("used signatures unavailable, taking an unkeyed write's signature as"
                        " unused: %s", exc)
            return True


def note_verified_signature(signature: str) -> None:
    """Keep the signature the identity check of the call under way verified (its app context's),
    for refuse_a_used_signature."""
    setattr(g, _VERIFIED_SIGNATURE, signature)


def refuse_a_used_signature() -> None:
    """401 UNTRUSTED_IDENTITY when the signature of the call under way was used before: for a
    write without an Idempotency-Key, over either transport. It is taken off once checked, so that
    a use case run later in the same app context (a test's, a command's) is not checked against
    it; there is none to check for a use case run in-process, with no call."""
    signature = g.pop(_VERIFIED_SIGNATURE, None)
    if signature is not None and \
            not current_app.extensions[SINGLE_USE_SIGNATURES_EXTENSION].first_use(signature):
        raise Unauthorized("Identity refused: the identity signature has been used before.",
                           code=InvalidIdentity.code)
