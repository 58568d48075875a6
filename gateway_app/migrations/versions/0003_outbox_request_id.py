"""Outbox rows keep their request id in a column; the relay makes the Kafka headers itself.

Revision ID: 0003
"""

from shared.migration_steps import outbox_headers_column, outbox_request_id_column

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    outbox_request_id_column()


def downgrade() -> None:
    outbox_headers_column()
