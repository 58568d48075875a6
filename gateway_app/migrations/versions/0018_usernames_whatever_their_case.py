"""A username is unique whatever its case: a unique index of each user's username key (the username
with its ASCII letters lowered, `ix_users_username_key`), which signing in finds the user through.
Refused, nothing changed, while two users hold usernames that differ only in case.

Usernames are of A-Za-z0-9_.- alone (and were, but for a final line break an early release let
through), where that lowering is Python's casefold() (gateway_app/usernames.py); translate(), not
lower(), which follows the database's LC_CTYPE. An index of the expression, no column: nothing to
write for the rows there, nor for those the release before goes on writing during a rolling
upgrade; its own ON CONFLICT (username) finds the username's unique constraint still there (a case
variant it signs up fails on the key's index: a 500, where this release answers 409).

Built concurrently (shared.migration_steps.create_unique_index_concurrently): the users table is
read (every signed-in request: gateway_app/sign_out.py) and written all along, neither blocked but
for moments. So the clashes are asked for before the build, under no lock, and one that a sign-up of
the release before makes meanwhile fails the build's uniqueness: refused all the same, in the same
line, the invalid index the build left dropped.

Revision ID: 0018
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_steps import UpgradeRefused, create_unique_index_concurrently

revision = "0018"
down_revision = "0017"

_KEY = "translate(username, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"
_INDEX = "ix_users_username_key"
# The clashes a refusal names, at most (it says how many more).
_NAMED_AT_MOST = 20


def upgrade() -> None:
    refuse_usernames_alike_but_for_their_case(op.get_bind())
    try:
        create_unique_index_concurrently(_INDEX, "users", [sa.text(_KEY)])
    except sa.exc.IntegrityError:
        # A clash signed up since the question (by the release before): named as any other.
        refuse_usernames_alike_but_for_their_case(op.get_bind())
        raise


def downgrade() -> None:
    # In the revision's transaction, with its version: a downgrade that fails leaves the index.
    op.drop_index(_INDEX, "users", if_exists=True)


def refuse_usernames_alike_but_for_their_case(conn: sa.Connection) -> None:
    """Refuse, naming each clash (its users oldest first), while two users or more hold usernames
    that differ only in case: one key cannot be both's, and which of them is the name's own is
    for the operator to say, not for the upgrade to guess (a rename is the way out: its user
    signs in under the new name)."""
    clashes = conn.execute(sa.text(
        f"SELECT array_agg(username ORDER BY created_at, id), array_agg(id ORDER BY created_at, id)"
        f" FROM users GROUP BY {_KEY} HAVING count(*) > 1 ORDER BY min(created_at)")).all()
    if not clashes:
        return
    named = "; ".join(
        ", ".join(f"{username!r} ({user_id})" for username, user_id in zip(names, ids))
        for names, ids in clashes[:_NAMED_AT_MOST])
    more = len(clashes) - _NAMED_AT_MOST
    raise UpgradeRefused(
        f"{len(clashes)} username(s) are held by two users or more in cases that differ, which"
        " this release takes for one username (a username is unique whatever its case, and signs"
        f" in typed in any): {named}" + (f"; and {more} more" if more > 0 else "") + ". Rename"
        " all but one user of each (UPDATE users SET username = 'NEW' WHERE id = 'ID', a name of"
        " A-Za-z0-9_.- no other user holds in any case; its user signs in under it from then on:"
        " tell them), then upgrade again; the gateway database stays at revision 0017, nothing"
        " was changed")
