"""Old handled inbox rows are pruned (shared.inbox.pruning.prune_handled_messages), found by an
index of the handled rows by when they were stored.

Revision ID: 0006
"""

from shared.migration_steps import drop_inbox_handled_index, index_handled_inbox_rows

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    index_handled_inbox_rows()


def downgrade() -> None:
    drop_inbox_handled_index()
