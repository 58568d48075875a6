"""Bearer tokens: signed (HS256), expiring, naming the user the gateway signed in."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import jwt

from shared.fields import USER_ID_PATTERN

ALGORITHM = "HS256"
ISSUER = "hseshop-gateway"
# The latest expiry a token may have: the last second a datetime holds (a signed-out token is kept
# until its expiry, as a datetime: gateway_app/sign_out.py). PyJWT takes any `exp` int() reads:
# a string of digits, a fraction, 10**400 (whose float, made below, overflowed: a 500).
LATEST_EXPIRY = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())


EXPIRED = "The token has expired; sign in again."


class InvalidToken(ValueError):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int  # whole seconds left, rounded down (issue_token)


def issue_token(user_id: str, username: str, secret: str, ttl_seconds: int,
                now: float | None = None, generation: int = 0) -> IssuedToken:
    """A token for the user, of their tokens' `generation` (gateway_app/sign_out.py: signing out
    everywhere moves it on, and the tokens of the generations before are refused), and the whole
    seconds it lasts from `now`, rounded down. Its times are whole seconds, `now`'s fraction
    dropped, so a token issued at x.6 has `ttl_seconds` less 0.6 left: a page told the whole
    `ttl_seconds` would take itself for signed in 0.6 s after the token expired (a socket ticket's
    `expires_in` is rounded down alike, gateway_app/socket_tickets.py)."""
    now = time.time() if now is None else now
    issued_at = int(now)
    expires_at = issued_at + ttl_seconds
    # `jti` makes each token its own, so that signing one out signs out no other: two sign-ins of
    # a user in the same second would otherwise be the same token.
    claims = {"sub": user_id, "username": username, "iss": ISSUER, "iat": issued_at,
              "exp": expires_at, "jti": secrets.token_urlsafe(16), "gen": generation}
    return IssuedToken(jwt.encode(claims, secret, algorithm=ALGORITHM),
                       math.floor(expires_at - now))


@dataclass(frozen=True)
class VerifiedToken:
    user_id: str
    expires_at: float  # seconds since the epoch
    digest: bytes  # what a signed-out token is remembered by (claims_digest)
    generation: int = 0  # of the user's tokens (issue_token)


def claims_digest(claims: dict) -> bytes:
    """What a token is known by once verified, a signed-out one remembered by it
    (gateway_app/sign_out.py): the SHA-256 of its claims, not of the string sent. One token can
    be written several ways that all verify (PyJWT takes a signature with a `=` after it, say),
    and a sign-out kept under one of them would let the others through. Each token's claims are
    its own (its `jti`), and what is kept is no token whoever reads it."""
    return hashlib.sha256(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
                          ).digest()


def verify_token(token: str, secret: str) -> VerifiedToken:
    """Signature, issuer and expiry decide. The issue time is not held against the token: one
    gateway instance's clock a little behind another's would refuse, as "issued in the future",
    a token its peer had just issued, and sign the shopper out."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                            options={"require": ["sub", "exp", "iat", "iss"],
                                     "verify_iat": False})
    except jwt.ExpiredSignatureError:
        raise InvalidToken(EXPIRED, "TOKEN_EXPIRED") from None
    except jwt.PyJWTError:
        raise InvalidToken("The token is not valid.", "INVALID_TOKEN") from None
    if not _claims_as_issued(claims):
        raise InvalidToken("The token is not valid.", "INVALID_TOKEN")
    return VerifiedToken(claims["sub"], float(claims["exp"]), claims_digest(claims),
                         claims.get("gen", 0))


def _claims_as_issued(claims: dict) -> bool:
    """Whether the claims the gateway reads are as issue_token writes them, of a token signed with
    the gateway's secret but not as the gateway signs (a secret shared with another issuer, or
    leaked): a user id (the services refuse any other, 502 for the page), an expiry in whole
    seconds no later than LATEST_EXPIRY, a generation in whole numbers (one the check could not
    compare, null say, would make it no check at all). A bool is an int to isinstance."""
    # (No `gen` in a token issued before there were generations: the first.)
    subject, expiry, generation = claims["sub"], claims["exp"], claims.get("gen", 0)
    return (isinstance(subject, str) and USER_ID_PATTERN.fullmatch(subject) is not None
            and type(expiry) is int and expiry <= LATEST_EXPIRY
            and type(generation) is int)
