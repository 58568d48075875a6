"""A username's key, Python's casefold() at sign-in, and PostgreSQL's translate() that fills
users.username_key: the two agree on every character a username may hold
(gateway_app/usernames.py)."""

from __future__ import annotations

import sys

from gateway_app.usernames import ASCII_LOWER, ASCII_UPPER, USERNAME_KEY_SQL, username_key
from shared.fields import USER_ID_PATTERN

# translate()'s work on a username, as USERNAME_KEY_SQL asks it of PostgreSQL.
_AS_POSTGRESQL_FOLDS = str.maketrans(ASCII_UPPER, ASCII_LOWER)


def test_a_usernames_key_is_one_whatever_the_case_it_is_typed_in():
    assert {username_key(typed) for typed in ("Alice.B-9_", "alice.b-9_", "ALICE.B-9_")} == {
        "alice.b-9_"}
    assert username_key("bob") != username_key("bobb")


def test_every_character_a_username_may_hold_folds_alike_in_python_and_in_postgresql():
    """Widening USER_ID_PATTERN to a character casefold() and translate() fold apart ("ß",
    "K" the Kelvin sign, any non-ASCII letter) fails here: sign-in would look for a key the
    database never holds."""
    allowed = [chr(point) for point in range(sys.maxunicode + 1)
               if USER_ID_PATTERN.fullmatch(chr(point))]
    assert len(allowed) == 65  # A-Z, a-z, 0-9 and _.-
    assert [character for character in allowed
            if username_key(character) != character.translate(_AS_POSTGRESQL_FOLDS)] == []
    assert USERNAME_KEY_SQL == f"translate(username, '{ASCII_UPPER}', '{ASCII_LOWER}')"
