"""Each user's newest notification that retention pruned: a page catching up from before it is
told that it missed some (gateway_app/notifications.py), where it was given what was left as if
that were all. Notifications pruned before this revision left no mark: they are not told of.

Revision ID: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"


def upgrade() -> None:
    op.create_table(
        "notification_prune_marks",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("pruned_through", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("notification_prune_marks")
