"""Inbox rows say whether a try of their message, by a task of its own, has begun and not ended
(`try_open`): the sweeper counts such a try, lost with its worker, as an attempt, and no handing
over that no try took up (shared.inbox.sweeping.claim_stalled_messages).

Revision ID: 0009
"""

from shared.migration_steps import add_inbox_try_open, drop_inbox_try_open

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    add_inbox_try_open()


def downgrade() -> None:
    drop_inbox_try_open()
