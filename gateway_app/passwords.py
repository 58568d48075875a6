"""Password hashing with scrypt (memory-hard, salted per password), from the standard library.

A password is hashed and checked in its Unicode NFKC form (as NIST SP 800-63B asks): "é" typed as
one character on one device and as "e" with a combining accent on another, or a full-width "ａ"
from an input method, are the same password. Such a hash is marked so (its scheme is
`scrypt-nfkc`). One unmarked (`scrypt`) was made before that mark: of the NFKC form, or, before
passwords were normalised, of the password as it was sent; a password whose form differs is
checked as sent too against such a hash alone, and a sign-in it lets through replaces it with a
marked one (needs_rehash), so that a wrong password costs that second hash only until then.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import unicodedata

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


# The scheme of a hash of the password's NFKC form, and of one made before that was marked (of the
# NFKC form or of the password as sent: which, the hash does not say).
NORMALISED_SCHEME, UNMARKED_SCHEME = "scrypt-nfkc", "scrypt"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(normalised(password).encode(), salt=salt, n=_N, r=_R, p=_P,
                  dklen=_KEY_LENGTH)
    return "$".join([NORMALISED_SCHEME, str(_N), str(_R), str(_P), _b64(salt), _b64(key)])


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made of: in its NFKC form, or, for an unmarked
    hash (needs_rehash), as sent too (a second hash, for a password not in its NFKC form alone:
    what it costs depends on what is sent and the user's hash, never on whether its user
    exists: an unknown name's is a marked one, as a user's is once signed in)."""
    form = normalised(password)
    return _checks(form, stored) or (
        form != password and _scheme(stored) == UNMARKED_SCHEME and _checks(password, stored))


def needs_rehash(stored: str) -> bool:
    """Whether a hash a password was verified against should be replaced with hash_password's:
    an unmarked one, which may be of the password as sent."""
    return _scheme(stored) != NORMALISED_SCHEME


def normalised(password: str) -> str:
    """The form a password is hashed and checked in, and its length counted (gateway_app.auth)."""
    return unicodedata.normalize("NFKC", password)


def _scheme(stored: str) -> str:
    return stored.partition("$")[0]


def _checks(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme not in (NORMALISED_SCHEME, UNMARKED_SCHEME):
            return False
        expected = base64.b64decode(key)
        actual = _scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                         p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: bytes, **parameters) -> bytes:
    with _hashing:
        return hashlib.scrypt(password, **parameters)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
