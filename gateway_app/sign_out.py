"""Signing a token out before it expires (`POST /api/auth/logout`): the token is remembered, by its
digest, in the gateway's database, which every gateway instance asks before it takes a token, so a
token signed out on one is refused by all of them, at once, and after any restart. Signing out
everywhere (`POST /api/auth/logout/everywhere`) moves the user's generation of tokens on: every
token issued before, of an earlier generation, is refused the same way, and those issued after
are taken.

A signed-out token is kept until a while after it has expired (FORGOTTEN_AFTER_EXPIRY_SECONDS): it
is refused as expired from then on. The while covers a gateway instance whose clock runs behind
the one that prunes, a worker's (tasks/retention.py: the token expires on the gateways' clocks,
not the database's): it still takes the token as unexpired, and must still find it signed out.

Each gateway process also remembers the tokens it has found signed out (RememberedSignOuts), and
refuses them again without asking the database.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from gateway_app.models import SignedOutToken, User
from gateway_app.tokens import VerifiedToken
from gateway_app.user_channels import wake_sockets
from shared.db import after_commit, db, delete_oldest_before, transaction

FORGOTTEN_AFTER_EXPIRY_SECONDS = 300.0
SIGNED_OUT = "The token has been signed out; sign in again."


def sign_out(token: VerifiedToken) -> None:
    """Remember `token` as signed out (a token signed out before stays so: nothing changes), then
    wake the user's open sockets, which close if theirs was that token."""
    with transaction() as session:
        after_commit(session, lambda: wake_sockets(token.user_id))
        session.execute(
            insert(SignedOutToken)
            .values(digest=token.digest,
                    expires_at=datetime.fromtimestamp(token.expires_at, timezone.utc))
            .on_conflict_do_nothing(index_elements=[SignedOutToken.digest]))


def sign_out_everywhere(token: VerifiedToken) -> None:
    """Refuse every token of the user issued until now, then wake their open sockets, which all
    close."""
    with transaction() as session:
        after_commit(session, lambda: wake_sockets(token.user_id))
        session.execute(update(User).where(User.id == token.user_id)
                        .values(token_generation=User.token_generation + 1))


def is_signed_out(token: VerifiedToken) -> bool:
    """Whether `token` has been signed out, itself or everywhere: two lookups by primary key in one
    query, given LOOKUP_LIMIT to wait for a lock or to answer (a DATABASE_BUSY then, not the
    request held for the session's 30 s), on a connection given back to the pool at once: the
    request that asks goes on to call a service, and must not hold a connection meanwhile.

    In autocommit, one round trip: PostgreSQL runs the statements of one string in a transaction
    of their own, which the limits last (in a transaction of the pool's, BEGIN and ROLLBACK were
    two more: 0.33 ms a lookup against 0.25, on one host). The connection is pooled back in
    transactions."""
    with db.engine.connect() as connection:
        with _in_autocommit(connection.connection.dbapi_connection):
            return connection.exec_driver_sql(_SIGNED_OUT, {
                "digest": token.digest, "user_id": token.user_id, "generation": token.generation,
                "limit": LOOKUP_LIMIT}).scalar() is True


# Where create_app keeps the process's RememberedSignOuts.
REMEMBERED = "hseshop.remembered_sign_outs"
# How many signed-out tokens a process remembers: some 150 bytes each (a digest, its place), 600 KB.
# Far more than the tokens a process sees signed out and used again while they last; one pushed
# out by a flood of others is asked of the database again, once.
REMEMBERED_SIGN_OUTS = 4096


class RememberedSignOuts:
    """The digests of the tokens this process has found signed out, at most `size` of them, the
    least recently refused forgotten first: such a token is refused again without a lookup (and
    before it is counted against its user's rate limit: gateway_app/auth.py).

    Never wrong, however long a digest is kept: a sign-out is never undone (a signed-out token's
    row is kept until after the token has expired, and a user's generation only moves on), and a
    digest is one token's (its claims, `jti` and all), so no token that is taken is known by it.
    One kept past its token's expiry is never asked about (the token is refused as expired before)
    and is pushed out in its turn. A lock: a gunicorn process serves requests on many threads."""

    def __init__(self, size: int = REMEMBERED_SIGN_OUTS):
        self._size = size
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, token: VerifiedToken) -> bool:
        """Whether `token` was found signed out here (not forgotten since)."""
        with self._lock:
            if token.digest not in self._digests:
                return False
            self._digests.move_to_end(token.digest)
            return True

    def remember(self, token: VerifiedToken) -> None:
        """`token` was found signed out: remember it, forgetting the least recently refused past
        `size`."""
        with self._lock:
            self._digests[token.digest] = None
            self._digests.move_to_end(token.digest)
            while len(self._digests) > self._size:
                self._digests.popitem(last=False)


@contextmanager
def _in_autocommit(dbapi_connection) -> Iterator[None]:
    """The pooled psycopg2 connection in autocommit for the block, then as it was (in transactions:
    the attribute alone, which sends nothing; SQLAlchemy's isolation_level option, on its way
    back, sends a SET, the round trip saved). A connection that broke is left as it is: the pool
    drops it, and the block's error is the one raised."""
    was = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        yield
    finally:
        if not dbapi_connection.closed:
            dbapi_connection.autocommit = was


# Asking whether a token has been signed out comes before every signed-in request: it may take
# no more than a small part of what a call to a service is given (UPSTREAM_TIMEOUT_SECONDS, 5 s).
LOOKUP_LIMIT = "1s"
# The limits are the transaction's only (set_config's `true`: SET LOCAL), and are sent with the
# lookup, two statements in one string: in autocommit, one implicit transaction, the lookup's.
# (A token of a user the gateway has no row of is taken: no user is ever deleted.)
_SIGNED_OUT = """
SELECT set_config('lock_timeout', %(limit)s, true),
       set_config('statement_timeout', %(limit)s, true);
SELECT EXISTS (SELECT FROM signed_out_tokens WHERE digest = %(digest)s)
       OR EXISTS (SELECT FROM users
                  WHERE id = %(user_id)s AND token_generation > %(generation)s)"""


def prune_expired_sign_outs(session: Session, cutoff: datetime, limit: int) -> int:
    """Forget up to `limit` signed-out tokens that expired before `cutoff`, the earliest first;
    returns how many (the caller repeats, a transaction each, until fewer than `limit`)."""
    # (Found through ix_signed_out_tokens_expires_at.)
    return delete_oldest_before(session, table="signed_out_tokens", column="expires_at",
                                cutoff=cutoff, limit=limit)
