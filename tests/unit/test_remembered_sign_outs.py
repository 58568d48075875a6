"""A gateway process's memory of the tokens it found signed out (pure logic): bounded, the least
recently refused forgotten first."""

from gateway_app.sign_out import RememberedSignOuts
from gateway_app.tokens import VerifiedToken


def _token(n: int) -> VerifiedToken:
    return VerifiedToken("usr_1", 0.0, n.to_bytes(32, "big"))


def test_past_its_size_the_least_recently_refused_token_is_forgotten():
    remembered = RememberedSignOuts(size=2)
    for n in (1, 2):
        remembered.remember(_token(n))
    assert remembered.known(_token(1))  # refused again: the most recent now
    remembered.remember(_token(3))
    assert [remembered.known(_token(n)) for n in (1, 2, 3)] == [True, False, True]
    assert not remembered.known(_token(4))


def test_a_flood_of_tokens_keeps_no_more_than_its_size():
    remembered = RememberedSignOuts(size=100)
    for n in range(10_000):
        remembered.remember(_token(n))
    assert sum(remembered.known(_token(n)) for n in range(10_000)) == 100
