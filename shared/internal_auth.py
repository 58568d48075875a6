"""Identity between the gateway and the services: the gateway signs the user id it decided on,
together with the request it sends for them, with a secret only it and the services know, and the
services accept no identity without that signature, nor one signed for another request.

Headers (or gRPC metadata, in lower case): `X-User-ID`, `X-Gateway-Timestamp` (Unix seconds),
`X-Gateway-Nonce` (32 hex digits, random) and `X-Gateway-Signature`: "v3=" and the hex
HMAC-SHA256, under INTERNAL_AUTH_SECRET, of these lines:

    hseshop-identity-v3, the user id, the timestamp, the method, the target, the body's SHA-256,
    the Idempotency-Key, the X-Gateway-Deadline, the nonce

where, over HTTP, the method is the request's, the target its path and query exactly as sent on
the request line (what the service's server hands over as RAW_URI), and the Idempotency-Key and
deadline the values of those headers as sent, each empty when the request has none; over gRPC
the method is GRPC_METHOD, the target the call's full method name
("/hseshop.orders.v1.Orders/PlaceOrder"), the body the request message's serialized bytes, the
Idempotency-Key line empty (the key is a field of the message, signed with it) and the deadline
the call's `x-gateway-deadline` metadata, which a call must carry (refused without it): the
call's own deadline (its gRPC timeout) is the caller's to set, so a captured call sent again with
a longer one would otherwise commit after the gateway's 504; shared.grpc_server keeps the earlier
of the two. So headers captured off one request (a balance read) vouch for that request alone:
not for a deposit, another order, another query or another body, nor with another deadline
(later: committed after the gateway's 504), over either transport; nor, over HTTP, for the same
deposit with another Idempotency-Key or none (each a new deposit). The gateway signs each try as
it sends it; a resend carries the same key and the same deadline (a moment,
shared/caller_deadline.py), signed afresh with its own timestamp and nonce.

The nonce makes each signature the gateway makes its own: without it, two requests alike in all
else (a user's two orders of one body, without an Idempotency-Key) signed in one second with one
deadline, a moment to the microsecond that two gateway processes or threads can both write, were
one signature, and the service took the second for a repeat of the first (401 SIGNATURE_USED:
shared.single_use_signatures), a legitimate order refused. 128 random bits (secrets.token_hex,
under a microsecond) leave no two alike. A signature without its nonce, or with one of another
form than the gateway writes, is refused (401 UNTRUSTED_IDENTITY), before its body is read:
taken without one, it would be checked as before, one signature for requests alike.

What stays possible is that same request sent again within the window: a signature is accepted up
to MAX_AGE_SECONDS after its timestamp (the gateway's resends, a busy service's queue) and no more
than MAX_AHEAD_SECONDS before it (the hosts' clocks apart, which NTP keeps far closer): the window
a captured request can be repeated in (for what the gateway signs, only until the signed
deadline, past which the work is rolled back: 504 CALLER_GAVE_UP). A read's repeat reads, a
keyed POST's is answered with its first answer (the gateway resends only those two), opening an
account twice is a 409; a write without an Idempotency-Key (an order, a deposit) takes its
signature once, in Redis, its repeat refused 401 SIGNATURE_USED: shared.single_use_signatures,
which says what Redis away leaves.

The "v3" is the format's version: a service of this release refuses the signature of a gateway of
an earlier one with SIGNATURE_VERSION_MISMATCH: the release before's ("v2=" and 64 hex digits,
signed without a nonce) and the one before that's (unversioned: 64 hex digits over the user id
and timestamp alone); a service of before refuses this one's as not the gateway's (its
UNTRUSTED_IDENTITY, a "v3=" being of no format it knows): a 401 either way, which the gateway
answers as a 502 and logs. Any other signature that is not "v3=" is a forgery or garbage to this
release, UNTRUSTED_IDENTITY. Gateway and services are deployed together (README: Deploying).

A request is refused without its body read when its identity headers fail every check but the
signature's own (missing, malformed, stale; `body` below may be a function, called last), with
one exception: a service reads a chunked body (no Content-Length) before any view or check, to
refuse one that is unreadable or over the limit (shared.app's
refuse_a_chunked_body_unreadable_or_over_the_limit), so such a body is read, up to the limit,
whatever its headers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping

USER_ID_HEADER = "X-User-ID"
TIMESTAMP_HEADER = "X-Gateway-Timestamp"
SIGNATURE_HEADER = "X-Gateway-Signature"
NONCE_HEADER = "X-Gateway-Nonce"
SIGNATURE_VERSION = "v3"
# The nonce's random bytes, written as twice as many hex digits: 128 bits, so that no two of the
# signatures the gateway makes, however many processes make them at once, are alike.
NONCE_BYTES = 16
MAX_AGE_SECONDS = 60
MAX_AHEAD_SECONDS = 5
# The method a gRPC call is signed with: no HTTP method, so that no HTTP request's signature is a
# gRPC call's (whose targets, full method names, could otherwise be paths too).
GRPC_METHOD = "GRPC"
# The headers of an HTTP request whose values are signed with it, the deadline's (in lower case)
# a gRPC call's metadata too. Named here, in a module that needs no Flask nor database, and taken
# from here by shared.idempotency (IDEMPOTENCY_HEADER) and shared.caller_deadline.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
DEADLINE_HEADER = "X-Gateway-Deadline"
SIGNED_HEADERS = (IDEMPOTENCY_KEY_HEADER, DEADLINE_HEADER)

_PREFIX = f"{SIGNATURE_VERSION}="
_CONTEXT = f"hseshop-identity-{SIGNATURE_VERSION}"
_EMPTY_BODY_DIGEST = hashlib.sha256(b"").hexdigest()
_NONCE = re.compile(f"[0-9a-f]{{{2 * NONCE_BYTES}}}")
# The signatures of the earlier releases: the release before's ("v2=", over the lines of this one
# but the nonce), and the one before that's, the bare hex HMAC-SHA256 of "<user id>|<timestamp>".
_EARLIER_FORMATS = re.compile(r"(v2=)?[0-9a-f]{64}")


class InvalidIdentity(ValueError):
    """The identity headers are missing, malformed, stale or not signed by the gateway for this
    request. `code`: the error code a service answers it with."""

    code = "UNTRUSTED_IDENTITY"


class SignatureVersionMismatch(InvalidIdentity):
    """Signed in an earlier release's format ("v2=" and 64 hex digits, or 64 hex digits
    unversioned): the gateway and the service are of different releases (deployed apart), not a
    forgery to be told apart from others. Any other format not this release's is
    UNTRUSTED_IDENTITY."""

    code = "SIGNATURE_VERSION_MISMATCH"


def _signature(secret: str, user_id: str, timestamp: str, method: str, target: str,
               body: bytes, signed_header_values: tuple[str, ...], nonce: str) -> str:
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_DIGEST
    message = "\n".join((_CONTEXT, user_id, timestamp, method, target, digest,
                         *signed_header_values, nonce))
    mac = hmac.new(secret.encode(), message.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return _PREFIX + mac.hexdigest()


def _signed_header_values(method: str, headers: Mapping[str, str]) -> tuple[str, ...]:
    """The values of SIGNED_HEADERS in an HTTP request's `headers` (or a gRPC call's metadata),
    each "" when it has none; the key's "" for a gRPC call (GRPC_METHOD), whose key is in its
    message."""
    return tuple("" if method == GRPC_METHOD and name == IDEMPOTENCY_KEY_HEADER
                 else header_value(headers, name) or "" for name in SIGNED_HEADERS)


def identity_headers(user_id: str, secret: str, method: str, target: str, body: bytes = b"",
                     now: float | None = None, *,
                     sent_with: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers (or gRPC metadata) that vouch for `user_id` sending the request `method
    target` with `body` and the X-Gateway-Deadline (over HTTP the Idempotency-Key too) of the
    headers it is `sent_with` (none: neither), and no other (over gRPC: GRPC_METHOD, the full
    method name and the message's bytes: see grpc_identity_metadata); each call's its own, by
    a nonce of its own, whatever the request and the moment."""
    timestamp = str(int(time.time() if now is None else now))
    signed = _signed_header_values(method, sent_with or {})
    nonce = secrets.token_hex(NONCE_BYTES)
    return {USER_ID_HEADER: user_id, TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce,
            SIGNATURE_HEADER: _signature(secret, user_id, timestamp, method, target, body, signed,
                                         nonce)}


def grpc_identity_metadata(user_id: str, secret: str, full_method: str, request: bytes,
                           deadline: str, now: float | None = None) -> list[tuple[str, str]]:
    """The call metadata that vouches for `user_id` calling `full_method` with the serialized
    message `request` by `deadline` (an X-Gateway-Deadline's value, shared.caller_deadline),
    which it carries too (and its nonce, x-gateway-nonce: identity_headers)."""
    sent_with = {DEADLINE_HEADER: deadline}
    signed = identity_headers(user_id, secret, GRPC_METHOD, full_method, request, now=now,
                              sent_with=sent_with)
    return [(name.lower(), value) for name, value in {**signed, **sent_with}.items()]


class SignedAs:
    """A requests `auth` that signs each request as the gateway does, as it is sent (each try of
    one sent again signed afresh): `session.get(url, auth=SignedAs(user_id, secret))`. Its target
    is the prepared request's path and query, which requests sends as they are (already quoted),
    its body what requests sends: bytes, or a str as http.client encodes it (ISO-8859-1), and its
    Idempotency-Key and X-Gateway-Deadline those of its headers (set before it is signed); each
    signing adds a nonce of its own (X-Gateway-Nonce)."""

    def __init__(self, user_id: str, secret: str):
        self.user_id, self.secret = user_id, secret

    def __call__(self, prepared):
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode("iso-8859-1")
        if not isinstance(body, bytes):  # (a file or a generator, streamed: not read here)
            raise TypeError("a signed request's body is given as bytes or a str")
        prepared.headers.update(identity_headers(self.user_id, self.secret, prepared.method,
                                                 prepared.path_url, body,
                                                 sent_with=prepared.headers))
        return prepared


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """The value of the header `name` in an HTTP request's headers (which Flask looks up whatever
    the case) or a gRPC call's metadata (whose keys are lower case), or None. Looked up by name:
    going through all of a request's headers (Werkzeug builds each name from the WSGI environ's
    key) cost a request more than the rest of the check, the HMAC included (6 µs against 4)."""
    value = headers.get(name)
    return headers.get(name.lower()) if value is None else value


def verified_user_id(headers: Mapping[str, str], secret: str, method: str, target: str,
                     body: bytes | Callable[[], bytes] = b"", now: float | None = None) -> str:
    """The user id the gateway vouched for, for the request `method target` with `body` and the
    X-Gateway-Deadline and X-Gateway-Nonce of its `headers` (over HTTP its Idempotency-Key too;
    over gRPC the deadline is required, and the nonce over both), as the service received it;
    raise InvalidIdentity otherwise. `body` may be a function that reads it: called only for
    headers that pass every other check, so that this check reads no body of a request with no
    identity (a chunked one is read before it all the same: see the module's docstring)."""
    user_id = header_value(headers, USER_ID_HEADER)
    timestamp = header_value(headers, TIMESTAMP_HEADER)
    signature = header_value(headers, SIGNATURE_HEADER)
    if not user_id or not timestamp or not signature:
        raise InvalidIdentity("the request carries no gateway-signed identity")
    if not signature.startswith(_PREFIX):
        if _EARLIER_FORMATS.fullmatch(signature):
            raise SignatureVersionMismatch(
                f"the identity signature is of an earlier release's format, not this one's "
                f"({SIGNATURE_VERSION}): the gateway and the service are of different releases")
        raise InvalidIdentity("the identity signature is of no format this service knows")
    # Digits only (int() takes signs, spaces and "_" too, none of which the gateway writes), and
    # few enough for a time (int() refuses over 4,300, a float overflows past 308: a 500 each).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise InvalidIdentity("the identity timestamp is not a number of seconds")
    ahead = int(timestamp) - (time.time() if now is None else now)
    if ahead < -MAX_AGE_SECONDS:
        raise InvalidIdentity("the identity signature has expired")
    if ahead > MAX_AHEAD_SECONDS:
        raise InvalidIdentity("the identity signature is dated in the future")
    # (Asked after the signature's format, as the nonce: an older gateway's call, which carries
    # no deadline, or no nonce, is told apart by its signature, SIGNATURE_VERSION_MISMATCH.)
    # (Left out, that is: one given empty goes on to the signature, which signs it as it would
    # sign none, and once that holds is refused for its form, 400 INVALID_DEADLINE, as over HTTP:
    # shared.caller_deadline.)
    if method == GRPC_METHOD and header_value(headers, DEADLINE_HEADER) is None:
        raise InvalidIdentity("the call carries no gateway-signed deadline")
    # Required, and of the form the gateway writes (a header given twice arrives joined by a
    # comma): taken as "" when left out, a signature made without one would hold, and a signer
    # that left it out would sign a user's requests alike as one again (the second refused).
    nonce = header_value(headers, NONCE_HEADER)
    if nonce is None:
        raise InvalidIdentity("the request carries no gateway nonce")
    if not _NONCE.fullmatch(nonce):
        raise InvalidIdentity(f"the gateway nonce is not {2 * NONCE_BYTES} hex digits")
    # As bytes: compare_digest refuses str with characters beyond ASCII (a TypeError, not a 401).
    if callable(body):
        body = body()
    expected = _signature(secret, user_id, timestamp, method, target, body,
                          _signed_header_values(method, headers), nonce).encode()
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected):
        raise InvalidIdentity("the identity signature is not the gateway's for this request")
    return user_id
