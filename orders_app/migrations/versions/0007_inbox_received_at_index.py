"""Old handled inbox rows are pruned (shared.inbox.prune_handled_messages), found by a BRIN index
on when they were stored.

Revision ID: 0007
"""

from shared.migration_steps import drop_inbox_received_at_index, index_inbox_by_received_at

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    index_inbox_by_received_at()


def downgrade() -> None:
    drop_inbox_received_at_index()
