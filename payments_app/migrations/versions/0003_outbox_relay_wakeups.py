"""Outbox rows are deleted once sent, and inserting them wakes the relay (LISTEN/NOTIFY).

Revision ID: 0003
"""

from shared.migration_steps import delete_sent_outbox_rows_and_notify_relay, keep_sent_outbox_rows

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    delete_sent_outbox_rows_and_notify_relay()


def downgrade() -> None:
    keep_sent_outbox_rows()
