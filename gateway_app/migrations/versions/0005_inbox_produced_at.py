"""Inbox rows keep when their message was produced (the Kafka record's timestamp), so that a
message's time in the relay and its time in Kafka and the consumer can be told apart.

Revision ID: 0005
"""

from shared.migration_steps import add_inbox_produced_at, drop_inbox_produced_at

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    add_inbox_produced_at()


def downgrade() -> None:
    drop_inbox_produced_at()
