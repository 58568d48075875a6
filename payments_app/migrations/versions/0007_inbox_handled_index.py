"""Old handled inbox rows are pruned (shared.inbox.pruning.prune_handled_messages), found by an
index of the handled rows by when they were stored.

Revision ID: 0007
"""

from shared.migration_steps import drop_inbox_handled_index, index_handled_inbox_rows

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    index_handled_inbox_rows()


def downgrade() -> None:
    drop_inbox_handled_index()
