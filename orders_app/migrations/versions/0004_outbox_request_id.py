"""Outbox rows keep their request id in a column; the relay makes the Kafka headers itself.

Revision ID: 0004
"""

from shared.migration_steps import outbox_headers_column, outbox_request_id_column

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    outbox_request_id_column()


def downgrade() -> None:
    outbox_headers_column()
