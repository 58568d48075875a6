"""Password hashing: what is hashed checks, what is not does not, and a process hashes no more
than HASHES_AT_ONCE passwords at a time, however many threads ask."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time

import pytest

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
    from_before = _hash_from_before(decomposed)
    assert passwords.verify_password(decomposed, from_before)
    assert not passwords.verify_password("cafe horse", from_before)


def _hash_from_before(password: str) -> str:
    """A hash the release before made: scheme `scrypt`, of `password` as it is given (as sent,
    before passwords were normalised)."""
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return "$".join(["scrypt", "16384", "8", "1", base64.b64encode(salt).decode(),
                     base64.b64encode(key).decode()])


def _verified_by_the_release_before(password: str, stored: str) -> bool:
    """verify_password as the release before has it (gateway_app/passwords.py before passwords
    were normalised): the password as sent, against a `scrypt` hash alone."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def test_the_release_before_verifies_a_new_hash_of_a_password_typed_in_its_nfkc_form():
    """Rolled back, or beside this release in a rolling upgrade, the release before signs in the
    users this one signed up (but for a password typed in another form: checked as sent there)."""
    for password in ("correct horse", "caf\u00e9 horse"):
        stored = passwords.hash_password(password)
        assert _verified_by_the_release_before(password, stored), password
        assert not _verified_by_the_release_before(password + "!", stored)


def _hashes_to_verify(monkeypatch, password: str, stored: str) -> tuple[bool, int]:
    """verify_password's verdict, and how many scrypt hashes it took."""
    hashes = []
    scrypt = passwords.hashlib.scrypt
    monkeypatch.setattr(passwords.hashlib, "scrypt",
                        lambda *a, **k: hashes.append(1) or scrypt(*a, **k))
    verdict = passwords.verify_password(password, stored)
    monkeypatch.setattr(passwords.hashlib, "scrypt", scrypt)
    return verdict, len(hashes)


def test_what_a_check_costs_depends_on_the_password_sent_alone(monkeypatch):
    """One hash for a password in its NFKC form, two for one not (its NFKC form and as sent),
    right or wrong, against a new hash or one the release before made of the password as sent:
    the time of the answer tells nothing of the user's hash."""
    decomposed, composed = "cafe\u0301 horse", "caf\u00e9 horse"
    new, from_before = passwords.hash_password(composed), _hash_from_before(decomposed)
    assert _hashes_to_verify(monkeypatch, decomposed, new) == (True, 2)
    assert _hashes_to_verify(monkeypatch, decomposed, from_before) == (True, 2)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 house", new) == (False, 2)
    assert _hashes_to_verify(monkeypatch, "cafe\u0301 house", from_before) == (False, 2)
    assert _hashes_to_verify(monkeypatch, composed, new) == (True, 1)
    assert _hashes_to_verify(monkeypatch, composed, from_before) == (False, 1)
    assert _hashes_to_verify(monkeypatch, "correct horse", new) == (False, 1)


def test_every_new_hash_has_the_scheme_the_release_before_reads():
    assert passwords.hash_password("cafe\u0301 horse").startswith("scrypt$")


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


def _hash_of_cost(password: str, n: int) -> str:
    """A hash of `password` as a release of a higher cost would make it (N = `n`), made here with
    the memory it takes."""
    salt = b"fedcba9876543210"
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, dklen=32,
                         maxmem=256 * 1024 * 1024)
    return "$".join(["scrypt", str(n), "8", "1", base64.b64encode(salt).decode(),
                     base64.b64encode(key).decode()])


def test_a_hash_of_a_higher_cost_made_elsewhere_checks(caplog):
    """hashlib's default memory limit, 32 MiB, refuses N = 2**15 outright: a later release that
    raised the cost would have left its users refused here, their password right, after a
    rollback. The limit is sized from the hash's own N and r."""
    stored = _hash_of_cost("correct horse", 2**15)
    assert passwords.verify_password("correct horse", stored)
    assert not passwords.verify_password("correct horse!", stored)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_a_stored_hash_that_cannot_be_read_is_logged_without_it_or_the_password(caplog):
    readable = _hash_of_cost("correct horse", 2**10)
    not_a_power_of_two = readable.replace("$1024$", "$1000$")
    for stored in ("not a hash", "bcrypt$16384$8$1$c2FsdHNhbHQ=$a2V5a2V5a2V5",
                   readable.replace("$8$", "$eight$"), not_a_power_of_two):
        caplog.clear()
        assert not passwords.verify_password("correct horse", stored)
        [record] = [record for record in caplog.records if record.levelname == "ERROR"]
        said = record.getMessage()
        assert "cannot be read" in said, said
        for part in stored.split("$")[4:] + ["correct horse"]:
            assert part not in said, (part, said)


def _all_turns_taken(monkeypatch) -> threading.BoundedSemaphore:
    hashing = threading.BoundedSemaphore(1)
    hashing.acquire()
    monkeypatch.setattr(passwords, "_hashing", hashing)
    return hashing


def test_no_turn_to_hash_within_the_wait_is_busy_not_a_wait_without_end(monkeypatch):
    """Each waiting holds a server thread of the gateway: a burst of sign-ins waited without end
    for a turn, and held every thread."""
    stored = passwords.hash_password("correct horse")
    hashing = _all_turns_taken(monkeypatch)
    began = time.monotonic()
    with pytest.raises(passwords.HashingBusy):
        passwords.hash_password("correct horse", 0.2)
    with pytest.raises(passwords.HashingBusy):
        passwords.verify_password("correct horse", stored, 0.2)
    assert 0.4 <= time.monotonic() - began < 2
    hashing.release()
    assert passwords.verify_password("correct horse", stored, 0.2)


def _waiters_until(count: int, wait: float) -> list[threading.Thread]:
    """`count` threads waiting their turn to hash, for at most `wait` seconds each."""
    waiters = [threading.Thread(target=passwords.hash_password, args=("pw", wait))
               for _ in range(count)]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + 10
    while passwords._waiting.count < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert passwords._waiting.count == count, "the waiters never waited"
    return waiters


def _let_go(hashing: threading.BoundedSemaphore, waiters: list[threading.Thread]) -> None:
    hashing.release()
    for waiter in waiters:
        waiter.join(30)
        assert not waiter.is_alive()


def test_past_the_most_that_may_wait_a_hash_is_busy_at_once(monkeypatch):
    hashing = _all_turns_taken(monkeypatch)
    monkeypatch.setattr(passwords, "WAITING_AT_MOST_EVER", 1)
    waiters = _waiters_until(1, 30)
    began = time.monotonic()
    with pytest.raises(passwords.HashingBusy):
        passwords.hash_password("pw", 5)
    assert time.monotonic() - began < 1
    _let_go(hashing, waiters)


def test_as_many_wait_as_the_wait_lets_hash_in_it(monkeypatch):
    """The most that may wait was 4 x HASHES_AT_ONCE whatever the wait: on one core the sixth
    sign-in in 60 ms was refused at once, to be served in a third of a second, and a longer wait
    set changed nothing. Now those served within the wait at a hash's typical time wait."""
    monkeypatch.setattr(passwords, "HASHES_AT_ONCE", 1)
    hashing = _all_turns_taken(monkeypatch)
    wait = 10 * passwords.TYPICAL_HASH_SECONDS
    assert passwords.waiting_at_most(wait) == 10
    assert passwords.waiting_at_most(100 * wait) == passwords.WAITING_AT_MOST_EVER
    waiters = _waiters_until(10, 30 * wait)  # (as the process's: each call its own)
    with pytest.raises(passwords.HashingBusy, match="10 waiting already"):
        passwords.hash_password("pw", wait)
    _let_go(hashing, waiters)


def test_a_stored_hash_of_a_cost_past_the_most_read_is_refused_before_it_is_hashed(
        monkeypatch, caplog):
    """N = 2**20 took 1 GiB for some seconds (the gateway container has 1 GB), p = 2**20 some
    twelve hours of a core, holding a turn to hash: a row anyone knowing its username could have
    the gateway read again and again."""
    readable = _hash_of_cost("correct horse", 2**10)
    salt_and_key = readable.split("$", 4)[4]
    hashes = []
    monkeypatch.setattr(passwords.hashlib, "scrypt", lambda *a, **k: hashes.append(k))
    for n, r, p in [(2**20, 8, 1), (2**14, 8, 2**20), (2**14, 2**10, 1), (2**16, 8, 2)]:
        caplog.clear()
        stored = f"scrypt${n}${r}${p}${salt_and_key}"
        began = time.monotonic()
        assert not passwords.verify_password("correct horse", stored, whose="usr_0123456789abcdef")
        assert time.monotonic() - began < 1
        [record] = [record for record in caplog.records if record.levelname == "ERROR"]
        assert "usr_0123456789abcdef" in record.getMessage()
        assert "cannot be read" in record.getMessage()
    assert hashes == []
    assert passwords.COST_AT_MOST == 2**16 * 8  # 64 MiB: four at once 256 MiB


def test_a_stored_hash_within_the_most_work_but_past_the_most_memory_is_refused_before_it_is_hashed(
        monkeypatch, caplog):
    """N = 2, r = 2**18 is this release's work (N * r * p) four times over, within COST_AT_MOST,
    but scrypt takes 128 * r * (N + p + 2) bytes, 160 MiB (some 0.6 s of a core): past the 64 MiB
    that four times this release's cost takes, it is unreadable as a higher cost is."""
    readable = _hash_of_cost("correct horse", 2**10)
    salt_and_key = readable.split("$", 4)[4]
    hashes = []
    monkeypatch.setattr(passwords.hashlib, "scrypt", lambda *a, **k: hashes.append(k))
    n, r, p = 2, 2**18, 1
    assert n * r * p <= passwords.COST_AT_MOST
    assert not passwords.verify_password("correct horse", f"scrypt${n}${r}${p}${salt_and_key}",
                                         whose="usr_0123456789abcdef")
    [record] = [record for record in caplog.records if record.levelname == "ERROR"]
    assert "usr_0123456789abcdef" in record.getMessage()
    assert "cannot be read" in record.getMessage()
    assert hashes == []
    assert passwords.MEMORY_AT_MOST == 4 * 128 * 8 * (2**14 + 3)  # 64 MiB and 12 KiB


def test_a_stored_hash_of_the_most_cost_read_checks():
    stored = _hash_of_cost("correct horse", 2**16)
    assert passwords.verify_password("correct horse", stored)
