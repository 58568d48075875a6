"""A username's key: what tells one username from another. A username is unique whatever its case
(`Alice` and `alice` are one user: nobody signs up as a look-alike of another's name), signs in
typed in any case, and is shown as its user typed it signing up (the sign-in's answer and its
token's `username` say `Alice` to one who signed in as `ALICE`).

The key is Unicode's case folding (`str.casefold()`) in Python, and in PostgreSQL translate() of
the username's ASCII letters to lower case (`username_key_of`), the expression of the users table's
unique index `ix_users_username_key` (the gateway's revision 0018), which sign-in finds a user
through: not lower(), which follows the database's LC_CTYPE (under a Turkish one an "I" may lower
to a dotless "ı"), and no PostgreSQL function folds as casefold() does ("ß" to "ss"). The two agree
on every character a username may hold, USER_ID_PATTERN's `A-Za-z0-9_.-`, ASCII, where casefold()
lowers the 26 letters and nothing else (tests/unit/test_usernames.py checks each one the pattern
takes: widening the pattern to a character they fold apart fails it). An index of an expression,
no column: the release before, which writes no key, signs users up under it during a rolling
upgrade all the same."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, literal

# The ASCII letters each username's key has lowered, as PostgreSQL's translate() takes them.
ASCII_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ASCII_LOWER = "abcdefghijklmnopqrstuvwxyz"


def username_key(username: str) -> str:
    """The key of `username` (one the UserId field took), as `username_key_of` computes it in
    PostgreSQL: one user's whatever the case it is typed in."""
    return username.casefold()


def username_key_of(username: ColumnElement[str]) -> ColumnElement[str]:
    """The key of the username SQL `username` holds (users.username), as PostgreSQL computes it:
    the expression `ix_users_username_key` indexes, its letters written into the statement (not
    parameters), for the planner to match it with the index's."""
    return func.translate(username, literal(ASCII_UPPER, literal_execute=True),
                          literal(ASCII_LOWER, literal_execute=True))
