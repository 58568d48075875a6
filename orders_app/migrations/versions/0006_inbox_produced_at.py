"""Inbox rows keep when their message was produced (the Kafka record's timestamp), so that a
message's time in the relay and its time in Kafka and the consumer can be told apart.

Revision ID: 0006
"""

from shared.migration_steps import add_inbox_produced_at, drop_inbox_produced_at

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    add_inbox_produced_at()


def downgrade() -> None:
    drop_inbox_produced_at()
