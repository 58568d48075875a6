"""Password hashing with scrypt (memory-hard, salted per password), from the standard library.

A password is hashed and checked in its Unicode NFKC form (as NIST SP 800-63B asks): "é" typed as
one character on one device and as "e" with a combining accent on another, or a full-width "ａ"
from an input method, are the same password, for every user but one kind. A hash made before
passwords were normalised is of the password as its user typed it: in its NFKC form (ASCII, a
composed "é"), that is the hash this release would make, and both forms work; in another (a
decomposed accent, full-width letters), only the form the user first typed works, for good, as
no hash is remade at sign-in (the release before must be able to read every hash).

Every hash has the one scheme the release before writes and reads, `scrypt`, with no mark of the
form it was made of, so that the release before reads the hashes this one leaves (a rollback, or
both side by side in a rolling upgrade): a hash of the NFKC form is, for a password typed in that
form (ASCII, say), the one it would have made. It checks the password as sent, though: a user
whose typed password is not in its NFKC form (rare: a decomposed accent, full-width letters) and
who signed up on this release cannot sign in on the release before after a rollback.

A hash the release before made is of the password as sent, so a password not in its NFKC form is
checked as sent too: always, whatever hash it is checked against and whether its NFKC form
matched, and an unknown name's alike (gateway_app.auth checks it against a hash of its own), so
that what a sign-in costs, one hash or two, depends only on what was sent, never on whether its
user exists or which release made their hash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import unicodedata
from collections.abc import Iterator

_N, _R, _P = 2**14, 8, 1  # about 16 MiB and tens of milliseconds per hash
_KEY_LENGTH = 32
# How many hashes a process computes at once, the others waiting their turn (as they would for a
# core): scrypt takes 16 MiB and a core's while, and lets go of the GIL, and the gateway's 200
# threads (most of them for notification sockets) would let a burst of sign-ups hash 200 at once,
# over 3 GiB a process. The cores it may run on (its affinity), four at most: a container's CPU
# quota is not among what it can see, and on a large host that would be many.
HASHES_AT_ONCE = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 2, 4)  # (Linux has the affinity; macOS does not)
_hashing = threading.BoundedSemaphore(HASHES_AT_ONCE)
# How many may wait their turn in a process at once, one more refused at once (HashingBusy): as
# many as get a turn within their wait when a hash takes TYPICAL_HASH_SECONDS (those past them
# would wait it out and be refused all the same), HASHES_AT_ONCE at least, WAITING_AT_MOST_EVER at
# most. Each waiting holds a server thread (the gateway's 200, most of them for notification
# sockets): with the wait 2 s, 34 a core hashing, 64 at most (a third of the threads).
TYPICAL_HASH_SECONDS = 0.06  # (a hash of this release's cost on one core of a current server)
WAITING_AT_MOST_EVER = 64


def _scrypt_bytes(n: int, r: int, p: int) -> int:
    """The memory scrypt takes for a hash of cost `n`, `r` and `p`, as OpenSSL counts it: its B
    (128 * r * p bytes), V (128 * r * N) and XY (256 * r) blocks."""
    return 128 * r * (n + p + 2)


# The highest cost of a stored hash that is read: 4 times this release's in work (N * r * p,
# COST_AT_MOST) and in memory (_scrypt_bytes, MEMORY_AT_MOST) alike, so at most 64 MiB (and some
# KiB) and some quarter of a second of a core a hash (N = 2**16: 0.2 s; half a second for the
# oddest shape they let through, N = 2 and p = 2**18, all PBKDF2), 256 MiB with HASHES_AT_ONCE at
# four (the gateway container has 1 GB). The work alone does not bound the memory: N = 2,
# r = 2**18 is this release's work four times over and takes 160 MiB. A stored hash of a higher
# cost (a corrupt or hostile row: N = 2**20 took 1 GiB, p = 2**20 twelve hours of a core, its turn
# held) is unreadable: a release raising the cost past this must have this raised a release
# before it.
COST_AT_MOST = 4 * _N * _R * _P
MEMORY_AT_MOST = 4 * _scrypt_bytes(_N, _R, _P)
# A margin past the memory scrypt takes (_scrypt_bytes), given as its limit: hashlib's default
# limit, 32 MiB, refuses N = 2**15 (32 MiB and its B and XY blocks) outright.
_SCRYPT_MEMORY_MARGIN = 1024 * 1024
# Every hash's, as the release before writes and reads it (no mark of the form hashed).
SCHEME = "scrypt"

log = logging.getLogger(__name__)


class HashingBusy(Exception):
    """No turn to hash came within the wait given, or waiting_at_most(wait) were waiting
    already."""


class Unreadable(ValueError):
    """A stored hash this release cannot read: why, in words that quote no part of it."""


def hash_password(password: str, wait: float | None = None) -> str:
    """`password`'s hash; waiting for a turn at most `wait` seconds (None: as long as it takes),
    else HashingBusy."""
    salt = secrets.token_bytes(16)
    with _turn(wait):
        key = hashlib.scrypt(normalised(password).encode(), salt=salt, n=_N, r=_R, p=_P,
                             dklen=_KEY_LENGTH, maxmem=_memory_for(_N, _R, _P))
    return "$".join([SCHEME, str(_N), str(_R), str(_P), _b64(salt), _b64(key)])


def verify_password(password: str, stored: str, wait: float | None = None,
                    whose: str = "its user") -> bool:
    """Whether `password` is the one `stored` was made of: in its NFKC form, or as sent (a hash
    made before passwords were normalised). A password not in its NFKC form costs two hashes,
    both always computed, one in it costs one: never more or less for whichever hash is stored.
    Both in one turn, waited for at most `wait` seconds (None: as long as it takes), else
    HashingBusy. A stored hash that cannot be read (of a cost past COST_AT_MOST or MEMORY_AT_MOST
    too) is said in an ERROR naming `whose` it is (its user cannot sign in until it is mended),
    and matches nothing."""
    form = normalised(password)
    with _turn(wait):
        try:
            checked = [_checks(form, stored)]
            if form != password:
                checked.append(_checks(password, stored))
        except Unreadable as exc:
            log.error("the stored password hash of %s cannot be read (%s): they cannot sign in"
                      " until it is mended", whose, exc)
            return False
    return any(checked)


def normalised(password: str) -> str:
    """The form a password is hashed and checked in, and its length counted (gateway_app.auth)."""
    return unicodedata.normalize("NFKC", password)


def _checks(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made of (Unreadable if `stored` cannot be
    read: not of this scheme or its form, or of a cost past COST_AT_MOST or MEMORY_AT_MOST, or
    scrypt refuses)."""
    fields = stored.split("$")
    if len(fields) != 6:
        raise Unreadable(f"{len(fields)} fields, not 6")
    scheme, n, r, p, salt, key = fields
    if scheme != SCHEME:
        raise Unreadable(f"not of the scheme {SCHEME!r}")
    try:
        n, r, p = int(n), int(r), int(p)
    except ValueError:
        raise Unreadable("N, r or p is no whole number") from None
    if min(n, r, p) < 1 or n * r * p > COST_AT_MOST:
        raise Unreadable(f"N={n}, r={r}, p={p}: N * r * p is not 1 to {COST_AT_MOST}")
    if _scrypt_bytes(n, r, p) > MEMORY_AT_MOST:
        raise Unreadable(f"N={n}, r={r}, p={p}: it would take {_scrypt_bytes(n, r, p)} bytes,"
                         f" past {MEMORY_AT_MOST}")
    try:
        salt, expected = base64.b64decode(salt), base64.b64decode(key)
    except ValueError:
        raise Unreadable("its salt or key is no base64") from None
    try:
        actual = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected),
                                maxmem=_memory_for(n, r, p))
    except (ValueError, OverflowError) as exc:  # (its message names no part of the hash)
        raise Unreadable(f"scrypt refuses N={n}, r={r}, p={p}: {exc}") from None
    return hmac.compare_digest(actual, expected)


def _memory_for(n: int, r: int, p: int) -> int:
    """The memory limit scrypt is given for a hash of cost `n`, `r` and `p`: what it takes, with a
    margin (a hash of a higher cost than this release makes, as a later one may, is read)."""
    return _scrypt_bytes(n, r, p) + _SCRYPT_MEMORY_MARGIN


def waiting_at_most(wait: float | None) -> int:
    """How many may wait their turn to hash at once, in a process whose waits are `wait` seconds
    (None: without limit): those served within it when a hash takes TYPICAL_HASH_SECONDS,
    between HASHES_AT_ONCE and WAITING_AT_MOST_EVER."""
    if wait is None:
        return WAITING_AT_MOST_EVER
    served = math.ceil(wait / TYPICAL_HASH_SECONDS) * HASHES_AT_ONCE
    return min(max(served, HASHES_AT_ONCE), WAITING_AT_MOST_EVER)


class _Waiting:
    """How many threads wait their turn to hash, each let in only while fewer than a number."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def enter(self, most: int) -> bool:
        with self._lock:
            if self.count >= most:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


_waiting = _Waiting()


@contextlib.contextmanager
def _turn(wait: float | None) -> Iterator[None]:
    """A turn to hash, waited for at most `wait` seconds (None: without limit); refused at once
    when waiting_at_most(wait) wait already."""
    most = waiting_at_most(wait)
    if not _waiting.enter(most):
        raise HashingBusy(f"{most} waiting already")
    try:
        if not _hashing.acquire(timeout=wait):
            raise HashingBusy(f"no turn within {wait} s")
    finally:
        _waiting.leave()
    try:
        yield
    finally:
        _hashing.release()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
