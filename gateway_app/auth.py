"""Signing up, signing in and signing out, and the bearer-token check every other /api route goes
through.

The gateway alone decides who the caller is: whatever `X-User-ID` a client sends is ignored, and
the services hear only the identity the gateway signs for them.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
import uuid
from collections.abc import Iterator

from flask import current_app, g, jsonify, request
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from gateway_app.models import User
from gateway_app.passwords import HashingBusy, hash_password, normalised, verify_password
from gateway_app.ratelimit import RATE_LIMITED, client_address
from gateway_app.sign_out import (REMEMBERED, SIGNED_OUT, is_signed_out, sign_out,
                                  sign_out_everywhere)
from gateway_app.socket_tickets import redeem_ticket
from gateway_app.tokens import EXPIRED, InvalidToken, VerifiedToken, issue_token, verify_token
from gateway_app.usernames import username_key, username_key_of
from shared.db import db, transaction
from shared.documented_errors import (DATABASE_UNAVAILABLE_OR_BUSY, RETRY_AFTER, WWW_AUTHENTICATE,
                                     DocumentedError)
from shared.errors import ApiError, Conflict, Unauthorized
from shared.fields import Text, UserId
from shared.http_api import Blueprint, EmptySchema

MISSING_TOKEN = DocumentedError(401, "MISSING_TOKEN", "no `Authorization: Bearer <token>` header",
                                headers=(WWW_AUTHENTICATE,))
INVALID_TOKEN = DocumentedError(401, "INVALID_TOKEN", "the token is not one the gateway issued",
                                headers=(WWW_AUTHENTICATE,))
TOKEN_EXPIRED = DocumentedError(401, "TOKEN_EXPIRED", "the token has expired: sign in again",
                                headers=(WWW_AUTHENTICATE,))
TOKEN_SIGNED_OUT = DocumentedError(401, "TOKEN_SIGNED_OUT",
                                   "the token has been signed out: sign in again",
                                   headers=(WWW_AUTHENTICATE,))
# What every route behind authenticate_bearer can answer for it (the database: asked whether the
# token has been signed out).
SIGNED_IN_ERRORS = (MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED, TOKEN_SIGNED_OUT, RATE_LIMITED,
                    *DATABASE_UNAVAILABLE_OR_BUSY)
USERNAME_TAKEN = DocumentedError(409, "USERNAME_TAKEN", "another user has this username, in this"
                                 " case or another (`Alice` and `alice` are one username)")
INVALID_CREDENTIALS = DocumentedError(401, "INVALID_CREDENTIALS",
                                      "no user has this username and password",
                                      headers=(WWW_AUTHENTICATE,))
SIGN_IN_BUSY = DocumentedError(
    503, "SIGN_IN_BUSY", "the gateway had no turn to hash the password within its wait (2 s by"
    " default), or as many sign-ins as it lets wait were waiting already: the password was not"
    " checked, nothing was stored, and a sign-in is not counted against the username's limits"
    " (it is against the address's, as every request to /api/auth): try again shortly",
    headers=(RETRY_AFTER,))


class SignInBusy(ApiError):
    """No turn to hash a password came in time (gateway_app.passwords.HashingBusy): a burst of
    sign-ins is answered at once, its requests' threads let go, not left to wait without end."""

    status = 503
    code = SIGN_IN_BUSY.code

    def __init__(self):
        super().__init__("Too many sign-ins are being checked just now; try again shortly.",
                         headers={RETRY_AFTER: "1"})


@contextlib.contextmanager
def _hashing_in_time() -> Iterator[float]:
    """The longest a request waits for a turn to hash (GATEWAY_SIGN_IN_WAIT_SECONDS); not given
    one in time, the request answers 503 SIGN_IN_BUSY."""
    try:
        yield current_app.extensions["hseshop.settings"].gateway_sign_in_wait_seconds
    except HashingBusy:
        raise SignInBusy() from None


class BearerRefused(Unauthorized):
    """A 401 of the gateway's, with the challenge RFC 9110 (15.5.2) asks every 401 to carry, in
    RFC 6750's (3) words for a bearer token: `error="invalid_token"` when the request's token is
    refused (not one the gateway issued, expired, signed out), the scheme alone when it sent none
    (3.1: a request that lacks authentication, or tried another scheme, is told no error). A
    sign-in's wrong password, sent in its body, is no bearer token refused: it is told the scheme
    a request authenticates with, as one without a token is. The body is every error's."""

    def __init__(self, message: str, code: str):
        no_token = code in (MISSING_TOKEN.code, INVALID_CREDENTIALS.code)
        challenge = "Bearer" if no_token else 'Bearer error="invalid_token"'
        super().__init__(message, code=code, headers={WWW_AUTHENTICATE: challenge})


blueprint = Blueprint("auth", __name__, url_prefix="/api/auth",
                      description="Sign up, sign in and sign out",
                      errors=(RATE_LIMITED, *DATABASE_UNAVAILABLE_OR_BUSY))

RATE_LIMITER = "hseshop.rate_limiter"
# Attempts to sign in under one username from one address a minute, right or wrong: beyond them,
# 429 before the password is checked. One address guessing one user's password is held to this;
# the user's own sign-ins need a few at most.
SIGN_INS_PER_USERNAME_AND_ADDRESS = 10
# Failed attempts to sign in under one username a minute, from all addresses together: once
# reached, 429 before the password is checked (the right one too), which bounds guessing from many
# addresses. Right passwords are not counted, and one address adds at most
# SIGN_INS_PER_USERNAME_AND_ADDRESS: keeping the user out takes five addresses at once, every
# minute. Higher would take more, and let more guesses through (50 a minute is 72,000 a day at
# one user, against 14,400 when every attempt counted at 10). Each attempt is counted as it begins
# and given back once its password proves right (RateLimiter.failure_reserved). (An address is
# an IPv6 one's /64: ratelimit.address_subject.)
FAILED_SIGN_INS_PER_USERNAME = 50


class PasswordLength(validate.Validator):
    """8 to 128 characters of the password's NFKC form, the one it is hashed and checked in
    (gateway_app.passwords): counted as sent, "e\u0301" * 4 (8) signed up, hashed as "é" * 4, and
    its user was refused signing in with "é" * 4 (4). `as_sent_too` (signing in): or 8 to 128 as
    sent, as lengths were counted before, so that nobody who signed up then is refused now.

    Not a validate.Length, nor with its `min`, `max` and `equal`, which apispec reads as one: it
    would give the OpenAPI documents a minLength and maxLength, which count the password as sent,
    and bodies the gateway takes would not be valid by them (U+FDFA, one character whose NFKC form
    is 18; "e\u0301" * 100, 200 as sent and 100 in NFKC). The field's description says it in
    words."""

    error = "Length must be between 8 and 128 characters in its NFKC form."
    # Signing in, where the length as typed is taken too.
    error_as_sent_too = "Length must be between 8 and 128 characters, in its NFKC form or as typed."

    # The longest a password can be as sent whose NFKC form is 128 or less: 4 times 128. NFKC is
    # the canonical composition of the compatibility decomposition (NFKD), which turns each code
    # point into one or more (never none): the NFKD form is at least as long as the password. And
    # composing joins into one code point at most as many as its canonical decomposition holds,
    # 4 at most (U+1F82, an alpha and three marks; a Hangul syllable 3): the NFKD form is at most
    # 4 times the NFKC one. (Unicode's composition stability keeps it so: a composite encoded
    # since 3.1 is excluded from composition. tests/unit/test_password_length.py checks the 4
    # against this Python's Unicode data.) So a password longer than this as sent is over 128 in
    # NFKC, and as sent: refused with the message any too long one gets, before it is normalised,
    # whose time in CPython grows with the square of a run of combining marks (a 64 KiB body, a
    # second of CPU). A password this long or shorter is normalised as before, in a millisecond at
    # most, whatever it grows to (U+FDFA, one code point, is 18 in NFKC).
    LONGEST_AS_SENT = 4 * 128

    def __init__(self, as_sent_too: bool = False):
        self.as_sent_too = as_sent_too
        self._error = self.error_as_sent_too if as_sent_too else self.error
        self._counted = validate.Length(min=8, max=128, error=self._error)

    def __call__(self, value: str) -> str:
        if len(value) > self.LONGEST_AS_SENT:
            raise ValidationError(self._error)
        if self.as_sent_too:
            try:
                return self._counted(value)
            except ValidationError:
                pass
        self._counted(normalised(value))
        return value  # (as sent: a hash made before passwords were normalised may be of it)


_PASSWORD_DESCRIPTION = ("8 to 128 characters (Unicode code points) in its NFKC form, which it is"
                         " hashed and checked in: an \"é\" typed as an \"e\" and a combining"
                         " accent counts one, U+FDFA (one character) 18. (No minLength or"
                         " maxLength here: they would count the password as typed.)")


_USERNAME_DESCRIPTION = ("One user's whatever its case: `Alice` and `alice` are one username,"
                         " which signs in typed in any case and is answered as its user typed it"
                         " signing up.")


class CredentialsSchema(Schema):
    class Meta:
        unknown = RAISE

    username = UserId(required=True, metadata={"description": _USERNAME_DESCRIPTION})
    password = Text(required=True, stored=False, validate=PasswordLength(), load_only=True,
                    metadata={"description": _PASSWORD_DESCRIPTION})


class SignInCredentialsSchema(CredentialsSchema):
    password = Text(required=True, stored=False, validate=PasswordLength(as_sent_too=True),
                    load_only=True, metadata={"description": (
                        f"{_PASSWORD_DESCRIPTION} A password set before passwords were"
                        " normalised may be 8 to 128 characters as typed instead.")})


class SessionSchema(Schema):
    # (an answer: every field always sent, as orders_app.schemas' are)
    user_id = fields.String(required=True)
    username = fields.String(required=True)
    access_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = fields.Integer(required=True, metadata={
        "description": "The whole seconds the token has left, rounded down: its `exp` is a"
                       " whole second, so one lasting 3600 s issued at x.6 s has 3599.4 s left"
                       " and says 3599"})


def _session_body(user: User) -> dict:
    settings = current_app.extensions["hseshop.settings"]
    token = issue_token(user.id, user.username, settings.auth_token_secret,
                        settings.auth_token_ttl_seconds, generation=user.token_generation)
    return {"user_id": user.id, "username": user.username, "access_token": token.access_token,
            "token_type": "Bearer", "expires_in": token.expires_in}


@blueprint.post("/register")
@blueprint.doc(security=[])  # (takes no token: the document's default asks for one)
@blueprint.arguments(CredentialsSchema)
@blueprint.response(201, SessionSchema)
@blueprint.errors(USERNAME_TAKEN, SIGN_IN_BUSY)
def register(args):
    """Create a user and sign them in."""
    with _hashing_in_time() as wait:
        password_hash = hash_password(args["password"], wait)
    with transaction() as session:
        # Nothing inserted on a conflict of any unique index: the username's key's (another user
        # has the name, in some case), and the username's own, kept for the release before
        # (gateway_app/models.py), which naming the key's alone would leave to end in a 500 when
        # met first. (The id's: 64 random bits, never met.)
        created = session.execute(
            insert(User).values(id=f"usr_{uuid.uuid4().hex[:16]}", username=args["username"],
                                password_hash=password_hash)
            .on_conflict_do_nothing().returning(User.id)
        ).first()
        if created is None:
            raise Conflict("That username is taken.", code="USERNAME_TAKEN")
        user = session.get(User, created.id)
        body = _session_body(user)
    return jsonify(body), 201


@blueprint.post("/login")
@blueprint.doc(security=[])  # (takes no token: the document's default asks for one)
@blueprint.arguments(SignInCredentialsSchema)
@blueprint.response(200, SessionSchema)
@blueprint.errors(INVALID_CREDENTIALS, SIGN_IN_BUSY)
def login(args):
    """Exchange a username and password for a bearer token."""
    # The username's key, in every limit's name too: `ALICE` is counted as `alice`, not given
    # budgets of its own. (A username has no colon: the address after it cannot be mistaken for
    # part of it.)
    limiter, key = current_app.extensions[RATE_LIMITER], username_key(args["username"])
    attempts, began = f"sign-in:{key}:{client_address()}", time.time()
    counted = limiter.check(attempts, now=began, limit=SIGN_INS_PER_USERNAME_AND_ADDRESS)
    try:
        return _signed_in(args, limiter, key)
    except SignInBusy:
        # Its password unchecked, the attempt is given back (the failed one too, by
        # failure_reserved): a client trying again each Retry-After through a busy spell was
        # refused 429 after ten. (Not the address's count, limit_by_address: every request to
        # /api/auth is counted there, as load, and a busy one held a thread while it waited.)
        if counted:
            limiter.give_back(attempts, began)
        raise


def _signed_in(args: dict, limiter, key: str):
    """login's answer, its attempt under the username from the address counted already."""
    # Counted as failed before the password is checked, and given back unless it proves wrong.
    with limiter.failure_reserved(f"failed-sign-in:{key}",
                                  limit=FAILED_SIGN_INS_PER_USERNAME) as failure:
        user = db.session.scalars(
            select(User).where(username_key_of(User.username) == key)).one_or_none()
        # The read's connection back to the pool before the password is checked (scrypt: some
        # 60 ms of CPU): a burst of sign-ins would otherwise hold every connection of the process,
        # and every signed-in request waits for one (whether its token was signed out). The
        # user's row, read whole, stays readable.
        db.session.close()
        # An unknown name is checked against a hash too, so the answer takes as long as for a user
        # whose hash is of this release's cost (one of a higher cost takes longer: passwords.py).
        with _hashing_in_time() as wait:
            stored = user.password_hash if user else _hash_no_password_matches(wait)
            whose = user.id if user else "no user"  # (named should the hash not be read)
            wrong = not verify_password(args["password"], stored, wait, whose) or user is None
        if wrong:
            failure.confirm()
        else:
            # Read again, by primary key, for the generation of tokens as it is now: a sign-out
            # everywhere committed while the password was checked would otherwise refuse the
            # token at once.
            user = db.session.get(User, user.id)
            db.session.close()
    if wrong or user is None:  # (None: the user's row gone meanwhile)
        raise BearerRefused("Wrong username or password.", INVALID_CREDENTIALS.code)
    return jsonify(_session_body(user))


@blueprint.post("/logout")
@blueprint.arguments(EmptySchema, required=False)
@blueprint.response(204, description="Signed out: the token is refused from now on (401"
                    " `TOKEN_SIGNED_OUT`), by every gateway instance, and the notification sockets"
                    " opened with it are closed (1008). A token signed out before: the same.")
@blueprint.errors(MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED)
def logout(_args):
    """Sign out: the bearer token is refused from now on."""
    sign_out(signed_token_or_401(_bearer_token()))
    return "", 204


@blueprint.post("/logout/everywhere")
@blueprint.arguments(EmptySchema, required=False)
@blueprint.response(204, description="Signed out everywhere: every token of the user issued until"
                    " now is refused (401 `TOKEN_SIGNED_OUT`), this one too, by every gateway"
                    " instance, and every notification socket of theirs is closed (1008). A"
                    " sign-in whose password check ends after this call commits gives a token that"
                    " is taken; one that had checked the password and read the user before, its"
                    " answer still on its way, gives a token issued until now, refused (sign in"
                    " again). Sent again with the same token: 401 `TOKEN_SIGNED_OUT`, as any call"
                    " with it.")
@blueprint.errors(*SIGNED_IN_ERRORS)
def logout_everywhere(_args):
    """Sign out everywhere: every token of the user is refused from now on."""
    sign_out_everywhere(verified_token_or_401(_bearer_token()))
    return "", 204


@functools.cache
def _hash_no_password_matches(wait: float) -> str:
    """What an unknown name's password is checked against: made once per process (by the first
    sign-in given a turn within `wait` seconds; the process's one setting), so that signing in
    under it costs one hash, as under a known name (making it each time cost two). Of this
    release's cost: a user whose hash is of a higher one (a later release's, read up to
    passwords.COST_AT_MOST) takes longer to check, which tells a name with such a hash from an
    unknown one."""
    return hash_password(secrets.token_urlsafe(32), wait)


def limit_by_address() -> None:
    """`before_request` for /api/auth (signing up, in and out): limit per client address."""
    current_app.extensions[RATE_LIMITER].check(f"addr:{client_address()}")


def authenticate_bearer() -> None:
    """`before_request` for the rest of /api: the bearer token decides the user, whose limit the
    request counts against (verified_token_or_401)."""
    g.token = verified_token_or_401(_bearer_token(), limited=True)
    g.user_id = g.token.user_id


def _bearer_token() -> str:
    """The request's `Authorization: Bearer <token>` token; a 401 MISSING_TOKEN without one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise BearerRefused("Sign in and send `Authorization: Bearer <token>`.",
                            MISSING_TOKEN.code)
    return token.strip()


def socket_token(token: str) -> VerifiedToken:
    """A notification socket's token, verified, its opening counted against its user's rate
    limit as any other /api request is (the socket's route is outside the /api blueprint)."""
    return verified_token_or_401(token, limited=True)


def socket_ticket_token(ticket: str) -> VerifiedToken:
    """A notification socket's ticket, redeemed (gateway_app/socket_tickets.py): the token it was
    asked for with, unexpired and not signed out; a 401 otherwise (UnknownTicket for a ticket
    unknown, used or expired). Not counted against the user's rate limit: asking for the ticket
    was, as opening a socket with the token is."""
    verified = redeem_ticket(ticket)
    if verified.expires_at <= time.time():
        raise BearerRefused(EXPIRED, TOKEN_EXPIRED.code)
    return signed_in_or_401(verified)


def verified_token_or_401(token: str, limited: bool = False) -> VerifiedToken:
    """The token, verified and not signed out; a 401 otherwise. `limited`: the request is counted
    against the user's rate limit too (a 429 past it).

    What costs nothing comes first: the signature and expiry, then this process's memory of the
    tokens it found signed out. Then the limit, then the database: past the limit a request asks
    the database nothing (a flood of them would hold the pool's connections, every signed-in
    request waiting for one). A signed-out token is counted against its user's limit the first
    time this process meets it, at most, and is refused from then on before the limit and the
    database both: used again and again, it costs neither, nor uses up its user's limit."""
    return signed_in_or_401(signed_token_or_401(token), limited)


def signed_in_or_401(verified: VerifiedToken, limited: bool = False) -> VerifiedToken:
    """A token verified already, not signed out (its limit counted if `limited`), in the order
    verified_token_or_401 says; a 401 otherwise."""
    remembered = current_app.extensions[REMEMBERED]
    if remembered.known(verified):
        raise BearerRefused(SIGNED_OUT, TOKEN_SIGNED_OUT.code)
    if limited:
        current_app.extensions[RATE_LIMITER].check(f"user:{verified.user_id}")
    if is_signed_out(verified):
        remembered.remember(verified)
        raise BearerRefused(SIGNED_OUT, TOKEN_SIGNED_OUT.code)
    return verified


def signed_token_or_401(token: str) -> VerifiedToken:
    """The token, its signature, issuer and expiry checked (signed out or not); a 401 otherwise."""
    try:
        return verify_token(token, current_app.extensions["hseshop.settings"].auth_token_secret)
    except InvalidToken as exc:
        raise BearerRefused(str(exc), exc.code) from None
