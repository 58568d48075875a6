"""Socket tickets: what a page opens its notification socket with instead of its bearer token. A
WebSocket URL is written into the access logs of every proxy on its way (gunicorn keeps none here,
and the gateway logs paths without their query, but a proxy in front logs the request line), so a
token in it would be kept there for as long as it is valid, hours; a ticket is random, good for
one socket, for TICKET_TTL_SECONDS at most, and only while the token it was asked for with is
still good: its expiry bounds the ticket's, and the socket asks whether the token has been signed
out (gateway_app/auth.py: socket_ticket_token) as it redeems it, after any sign-out it would
have to escape.

Kept in the gateway's Redis, so a ticket asked for on one instance opens a socket on another, by
its digest (what Redis holds opens no socket), and taken with GETDEL: two handshakes with one
ticket, on two instances at once, open one socket."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from flask import current_app

from gateway_app.tokens import VerifiedToken
from gateway_app.user_channels import redis_client
from shared.config import REDIS_KEY_SEPARATOR

# Long enough for a page to open its socket on a slow network, short enough that a ticket read
# from a log is spent or gone.
TICKET_TTL_SECONDS = 30


class UnknownTicket(ValueError):
    """No such ticket: never issued, used already, or expired."""

    def __init__(self):
        super().__init__("The ticket is unknown, used or expired; ask for another.")


class TokenExpiresTooSoon(ValueError):
    """The token has less than a second left (or none): a ticket for it would be spent before
    a page could use it, and its `expires_in`, whole seconds, could not say how soon."""


@dataclass(frozen=True)
class IssuedTicket:
    ticket: str
    expires_in: int  # seconds


def issue_ticket(token: VerifiedToken, now: float | None = None) -> IssuedTicket:
    """A new ticket for `token`'s socket, kept for TICKET_TTL_SECONDS or until the token expires,
    whichever comes first, its `expires_in` the whole seconds it lasts, rounded down (a page told
    30 s of a ticket with 29.2 left could come too late); TokenExpiresTooSoon for a token with
    less than a second left, redis.RedisError with Redis away."""
    now = time.time() if now is None else now
    lasts_ms = min(TICKET_TTL_SECONDS * 1000, int((token.expires_at - now) * 1000))
    if lasts_ms < 1000:
        raise TokenExpiresTooSoon()
    ticket = secrets.token_urlsafe(32)
    held = json.dumps({"user_id": token.user_id, "expires_at": token.expires_at,
                       "digest": token.digest.hex(), "generation": token.generation})
    redis_client().set(_key(ticket), held, px=lasts_ms)
    return IssuedTicket(ticket, lasts_ms // 1000)


def redeem_ticket(ticket: str) -> VerifiedToken:
    """The token `ticket` was issued for, the ticket gone with it (UnknownTicket if there is none;
    redis.RedisError with Redis away). Whether that token is still good is the caller's to ask."""
    held = redis_client().getdel(_key(ticket)) if ticket else None
    if held is None:
        raise UnknownTicket()
    fields = json.loads(held)
    return VerifiedToken(fields["user_id"], float(fields["expires_at"]),
                         bytes.fromhex(fields["digest"]), int(fields["generation"]))


def spend_tickets(tickets: list[str]) -> None:
    """Forget `tickets`, unredeemed (redis.RedisError with Redis away): those of a handshake
    refused before they are redeemed, whose URL, in a proxy's log, would otherwise open a socket
    for the rest of their time."""
    if tickets:
        redis_client().delete(*(_key(ticket) for ticket in tickets))


def _key(ticket: str) -> str:
    prefix = current_app.extensions["hseshop.settings"].redis_key_prefix
    return (f"{prefix}{REDIS_KEY_SEPARATOR}socket-ticket:"
            f"{hashlib.sha256(ticket.encode()).hexdigest()}")
