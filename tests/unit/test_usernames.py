"""A username's key, Python's casefold() at sign-in, and PostgreSQL's translate() that the users
table's unique index of the key computes (gateway_app/usernames.py): the two agree on every
character a username may hold."""

from __future__ import annotations

import sys

from sqlalchemy import column
from sqlalchemy.dialects import postgresql

from gateway_app.usernames import ASCII_LOWER, ASCII_UPPER, username_key, username_key_of
from shared.fields import USER_ID_PATTERN

# translate()'s work on a username, as username_key_of asks it of PostgreSQL.
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


def test_postgresql_computes_the_key_by_translate_of_the_ascii_letters_written_out():
    """The expression the index holds and sign-in asks by: its letters in the statement itself,
    for the planner to match the index's expression."""
    compiled = username_key_of(column("username")).compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    assert str(compiled) == f"translate(username, '{ASCII_UPPER}', '{ASCII_LOWER}')"
