"""Messages waiting in the inbox, by Kafka key: a batch takes the waiting messages of its keys
along, so that one key's messages are handled in order.

Revision ID: 0005
"""

from shared.migration_steps import drop_inbox_pending_key_index, inbox_pending_key_index

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    inbox_pending_key_index()


def downgrade() -> None:
    drop_inbox_pending_key_index()
