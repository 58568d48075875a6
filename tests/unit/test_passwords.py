"""Password hashing: what is hashed checks, what is not does not, and a process hashes no more
than HASHES_AT_ONCE passwords at a time, however many threads ask."""

from __future__ import annotations

import threading
import time

from gateway_app import passwords


def test_a_password_checks_against_its_hash_and_no_other_does():
    stored = passwords.hash_password("correct horse")
    assert passwords.verify_password("correct horse", stored)
    assert not passwords.verify_password("correct horse battery", stored)
    assert not passwords.verify_password("correct horse", "not a hash")


def test_a_password_checks_in_any_unicode_form_of_it_and_a_hash_from_before_still_checks():
    composed, decomposed, full_width = "caf\u00e9 horse", "cafe\u0301 horse", "\uff43af\u00e9 horse"
    stored = passwords.hash_password(composed)
    assert passwords.verify_password(decomposed, stored)
    assert passwords.verify_password(full_width, stored)
    assert not passwords.verify_password("cafe horse", stored)
    # A hash made before passwords were normalised: of the password as it was sent.
    salt = b"0123456789abcdef"
    key = passwords.hashlib.scrypt(decomposed.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    from_before = "$".join(["scrypt", "16384", "8", "1", passwords._b64(salt),
                            passwords._b64(key)])
    assert passwords.verify_password(decomposed, from_before)
    assert not passwords.verify_password("cafe horse", from_before)


def _unmarked_hash_of(password: str) -> str:
    """A hash made before hashes were marked normalised (scheme `scrypt`), of `password` as it is
    given (as sent, before passwords were normalised)."""
    salt = b"0123456789abcdef"
    key = passwords.hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return "$".join(["scrypt", "16384", "8", "1", passwords._b64(salt), passwords._b64(key)])


def _hashes_to_verify(monkeypatch, password: str, stored: str) -> tuple[bool, int]:
    """verify_password's verdict, and how many scrypt hashes it took."""
    hashes = []
    scrypt = passwords.hashlib.scrypt
    monkeypatch.setattr(passwords.hashlib, "scrypt",
                        lambda *a, **k: hashes.append(1) or scrypt(*a, **k))
    verdict = passwords.verify_password(password, stored)
    monkeypatch.setattr(passwords.hashlib, "scrypt", scrypt)
    return verdict, len(hashes)


def test_a_new_hash_is_marked_normalised_and_a_wrong_password_costs_it_one_hash(monkeypatch):
    """Only an unmarked hash may be of the password as sent: against a marked one, a wrong
    password not in its NFKC form is hashed once, not a second time as sent."""
    stored = passwords.hash_password("caf\u00e9 horse")
    assert stored.startswith("scrypt-nfkc$") and not passwords.needs_rehash(stored)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 house", stored) == (False, 1)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 horse", stored) == (True, 1)


def test_an_unmarked_hash_checks_the_password_as_sent_too_and_needs_replacing(monkeypatch):
    from_before = _unmarked_hash_of("cafe\u0301 horse")
    assert passwords.needs_rehash(from_before)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 horse", from_before) == (True, 2)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 house", from_before) == (False, 2)
    # One made of the NFKC form before the mark (which checks first).
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 horse",
                             _unmarked_hash_of("caf\u00e9 horse")) == (True, 1)


def test_threads_hashing_at_once_take_turns_past_hashes_at_once(monkeypatch):
    hashing, most = 0, 0
    counting = threading.Lock()
    scrypt = passwords.hashlib.scrypt

    def counted_scrypt(password, **parameters):
        nonlocal hashing, most
        with counting:
            hashing += 1
            most = max(most, hashing)
        time.sleep(0.05)  # (scrypt lets go of the GIL as it works)
        try:
            return scrypt(password, **parameters)
        finally:
            with counting:
                hashing -= 1

    monkeypatch.setattr(passwords.hashlib, "scrypt", counted_scrypt)
    threads = [threading.Thread(target=passwords.hash_password, args=("pw",))
               for _ in range(passwords.HASHES_AT_ONCE * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most == passwords.HASHES_AT_ONCE
