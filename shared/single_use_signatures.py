"""A gateway signature that vouches for a write without an Idempotency-Key is accepted once: a
captured order or deposit sent again within its signature's window (shared.internal_auth) is
refused 401 SIGNATURE_USED, where it was carried out again. That window is short for what the
gateway signs: its requests carry a signed deadline (UPSTREAM_TIMEOUT_SECONDS, 5 s by default;
shared.caller_deadline), past which the service's transaction() rolls the work back (504
CALLER_GAVE_UP), so a repeat could be carried out only within those seconds; the signature's
whole minute was open only to a request signed without a deadline (over HTTP, a caller signing
for itself).

Only there: a read changes nothing, a keyed write's repeat is answered with its first answer
(shared.idempotency) and the gateway sends again only those two (gateway_app/resends.py, over either
transport), and opening an account twice is a 409. So the check costs one Redis round trip per
unkeyed write, and none elsewhere. Each use is noted (SET NX, a digest of the signature) before the
work, and kept for as long as the signature could be accepted. Each signature is made once: a random
nonce is signed with every request (shared.internal_auth), so a user's two orders alike are two
signatures however close together they are signed, and by however many gateway processes. They were
one when signed in the same second with the same deadline (a moment to the microsecond, which two
gateway processes or threads could both write), and the second was refused as a repeat: only a
signed request sent again is one now.

A signed unkeyed write is one try; retry by signing again. The use is noted before the work, so a
first try that fails (a 503, a 504) has used its signature up too, and its repeat is refused. It
is not taken back when the work is rolled back: a 503 whose commit went through all the same
(its answer lost) would let the repeat place a second order. The gateway signs each try anew,
and sends an unkeyed write once.

Redis unreachable (or too slow, past 0.25 s), the write goes through, said at WARNING as the
outage begins (and once a minute while it lasts) and at INFO once it is over (shared.outage_log),
not once per write: a shop takes orders with Redis down, as it reads without the cache, and
meanwhile a captured unkeyed write can be repeated within its window, as before this check. So
can one whose note Redis lost (a restart without its appendonly file, a failover).
"""

from __future__ import annotations

import hashlib
import logging

import redis
from flask import current_app, g

from shared.errors import SignatureUsed
from shared.internal_auth import MAX_AGE_SECONDS, MAX_AHEAD_SECONDS
from shared.outage_log import OutageLog, OutageWords

log = logging.getLogger(__name__)

SINGLE_USE_SIGNATURES_EXTENSION = "hseshop.single_use_signatures"
# How long a use is kept: the longest a signature is accepted after it is first used (its
# timestamp up to MAX_AHEAD_SECONDS ahead then, and accepted MAX_AGE_SECONDS after it), with as much
# again for the clocks of the service's hosts, which may each read the timestamp.
_KEPT_SECONDS = MAX_AGE_SECONDS + 2 * MAX_AHEAD_SECONDS + 1
# Where shared.identity leaves the signature of the call under way, once verified.
_VERIFIED_SIGNATURE = "hseshop_verified_signature"
# What is said of Redis away (SingleUseSignatures._outage), once an outage, not once a write.
_REDIS_OUTAGE_WORDS = OutageWords(
    begun="%(what)s unavailable, taking unkeyed writes' signatures as unused until it answers:"
          " %(said)s",
    still="%(what)s still unavailable after %(seconds).0f s (%(tries)d unkeyed writes' signatures"
          " taken as unused): %(said)s",
    over="%(what)s available again after %(seconds).0f s (%(tries)d unkeyed writes' signatures"
         " taken as unused meanwhile)")


class SingleUseSignatures:
    """The signatures used for unkeyed writes, in Redis under `prefix`."""

    def __init__(self, redis_url: str, prefix: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.25,
                                            socket_connect_timeout=0.25)
        self._prefix = prefix
        self._outage = OutageLog(log, "used signatures", _REDIS_OUTAGE_WORDS)

    def close(self) -> None:
        self._client.close()

    def first_use(self, signature: str) -> bool:
        """Note a use of `signature`: False when it was used before; True the first time, and
        when Redis cannot tell (said once an outage: _outage)."""
        digest = hashlib.sha256(signature.encode("utf-8", "replace")).hexdigest()
        try:
            first = bool(self._client.set(f"{self._prefix}:signature-used:{digest}", 1, nx=True,
                                          ex=_KEPT_SECONDS))
        except redis.RedisError as exc:
            self._outage.failed(str(exc))
            return True
        self._outage.back()
        return first


def note_verified_signature(signature: str) -> None:
    """Keep the signature the identity check of the call under way verified (its app context's),
    for refuse_a_used_signature."""
    setattr(g, _VERIFIED_SIGNATURE, signature)


def refuse_a_used_signature() -> None:
    """401 SIGNATURE_USED when the signature of the call under way was used before: for a
    write without an Idempotency-Key, over either transport. It is taken off once checked, so that
    a use case run later in the same app context (a test's, a command's) is not checked against
    it; there is none to check for a use case run in-process, with no call."""
    signature = g.pop(_VERIFIED_SIGNATURE, None)
    if signature is not None and \
            not current_app.extensions[SINGLE_USE_SIGNATURES_EXTENSION].first_use(signature):
        raise SignatureUsed()
