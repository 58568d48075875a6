"""Old handled inbox rows are pruned (shared.inbox.prune_handled_messages), found by a BRIN index
on when they were stored.

Revision ID: 0006
"""

from shared.migration_steps import drop_inbox_received_at_index, index_inbox_by_received_at

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    index_inbox_by_received_at()


def downgrade() -> None:
    drop_inbox_received_at_index()
