"""Bearer tokens (pure logic): what verifying one tells the gateway."""

import time
from datetime import datetime, timezone

import jwt
import pytest

from gateway_app.tokens import (LATEST_EXPIRY, InvalidToken, claims_digest, issue_token,
                                verify_token)

SECRET = "a secret at least as long as the ones the shop uses"


def test_a_verified_token_names_its_user_and_when_it_expires():
    issued_at = int(time.time())
    token = issue_token("usr_1", "ann", SECRET, 90, now=issued_at).access_token
    verified = verify_token(token, SECRET)
    assert (verified.user_id, verified.expires_at) == ("usr_1", issued_at + 90)


def test_a_tokens_expires_in_is_the_whole_seconds_it_has_left_rounded_down(monkeypatch):
    """Its times are whole seconds: issued at x.5, a token of 90 s has 89.5 left, and a page told
    90 would take itself for signed in half a second after the token expired (401 TOKEN_EXPIRED).
    Told of `now`, or reading the clock itself, once (as the gateway's sign-in does)."""
    now = int(time.time()) + 0.5
    monkeypatch.setattr(time, "time", lambda: now)
    for issued in (issue_token("usr_1", "ann", SECRET, 90, now=now),
                   issue_token("usr_1", "ann", SECRET, 90)):
        expires_at = verify_token(issued.access_token, SECRET).expires_at
        assert issued.expires_in <= expires_at - now and issued.expires_in == 89
    on_the_second = issue_token("usr_1", "ann", SECRET, 90, now=int(now))
    assert on_the_second.expires_in == 90


def test_an_expired_token_is_refused_as_expired():
    token = issue_token("usr_1", "ann", SECRET, 60, now=time.time() - 3600).access_token
    with pytest.raises(InvalidToken) as refused:
        verify_token(token, SECRET)
    assert refused.value.code == "TOKEN_EXPIRED"


def test_a_token_from_a_gateway_whose_clock_runs_a_little_ahead_is_accepted():
    """Several gateway instances sign and check each other's tokens: a sign-in on one whose clock
    is a second ahead, then the page's next call landing on this one."""
    issued_at = int(time.time()) + 2
    token = issue_token("usr_1", "ann", SECRET, 60, now=issued_at).access_token
    assert verify_token(token, SECRET).expires_at == issued_at + 60


def test_each_token_is_its_own_and_is_known_by_its_claims():
    """Signing a token out must sign out no other: two issued in the same second differ. And the
    same token written another way that verifies too (a `=` after its signature) is the same
    token: its digest, what a sign-out is kept under, is its claims'."""
    issued_at = int(time.time())
    one, other = (issue_token("usr_1", "ann", SECRET, 90, now=issued_at).access_token
                  for _ in range(2))
    assert one != other
    assert verify_token(one, SECRET).digest != verify_token(other, SECRET).digest
    claims = jwt.decode(one, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert verify_token(one, SECRET).digest == claims_digest(claims) == verify_token(
        one + "=", SECRET).digest


@pytest.mark.parametrize("generation", [None, True, 0.5, "0", [1]])
def test_a_token_whose_generation_is_no_whole_number_is_refused(generation):
    """Signed, but not as the gateway signs: a generation the check could not compare (null would
    make it no check at all) is no generation."""
    claims = {"sub": "usr_1", "username": "ann", "iss": "hseshop-gateway",
              "iat": int(time.time()), "exp": int(time.time()) + 60, "gen": generation}
    with pytest.raises(InvalidToken) as refused:
        verify_token(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET)
    assert refused.value.code == "INVALID_TOKEN"


def _signed(**claims) -> str:
    """A token signed with the secret, of the gateway's claims but for `claims`."""
    now = int(time.time())
    return jwt.encode({"sub": "usr_1", "username": "ann", "iss": "hseshop-gateway", "iat": now,
                       "exp": now + 60, "gen": 0, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("expiry", [
    10**400,  # (its float overflowed: a 500)
    LATEST_EXPIRY + 1,  # (past what a datetime holds: signing it out was a 500)
    str(LATEST_EXPIRY),  # (a string of digits: PyJWT reads it with int())
    LATEST_EXPIRY - 0.5,
], ids=["10**400", "past a datetime", "digits", "fraction"])
def test_a_token_whose_expiry_is_no_whole_second_a_datetime_holds_is_refused(expiry):
    """Signed with the secret but not as the gateway signs: PyJWT takes any `exp` int() reads."""
    with pytest.raises(InvalidToken) as refused:
        verify_token(_signed(exp=expiry), SECRET)
    assert refused.value.code == "INVALID_TOKEN"


def test_a_token_expiring_at_the_latest_second_is_taken_and_its_expiry_a_datetime():
    verified = verify_token(_signed(exp=LATEST_EXPIRY), SECRET)
    assert verified.expires_at == LATEST_EXPIRY
    assert datetime.fromtimestamp(verified.expires_at, timezone.utc).year == 9999


@pytest.mark.parametrize("subject", ["u" * 10_000, "usr 1", "usr_1\n", "", "usr_\u00e9"],
                         ids=["10,000 characters", "a space", "a newline", "empty", "non-ASCII"])
def test_a_token_whose_subject_is_no_user_id_is_refused(subject):
    """A user id is what the services take (shared.fields.USER_ID_PATTERN): any other subject was
    taken, and the service's refusal of it answered 502."""
    with pytest.raises(InvalidToken) as refused:
        verify_token(_signed(sub=subject), SECRET)
    assert refused.value.code == "INVALID_TOKEN"
