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
