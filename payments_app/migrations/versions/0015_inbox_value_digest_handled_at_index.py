"""Inbox rows keep a digest of the value of the record they were stored from (`value_digest`),
by which a record under a message id already stored is told a repeat when its bytes are the same
(shared.inbox.taken_ids); and old handled inbox rows are pruned through an index of the handled
rows by when they were handled, which replaces the one by when they were stored
(shared.inbox.pruning.prune_handled_messages).

Revision ID: 0015
"""

from shared.migration_steps import (add_inbox_value_digest, drop_inbox_value_digest,
                                    index_handled_inbox_rows_by_handling,
                                    index_handled_inbox_rows_by_storing_again)

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    add_inbox_value_digest()
    index_handled_inbox_rows_by_handling()


def downgrade() -> None:
    index_handled_inbox_rows_by_storing_again()
    drop_inbox_value_digest()
