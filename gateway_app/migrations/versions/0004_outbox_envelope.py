"""Outbox rows keep the whole message as the relay sends it, serialised once by the writer (as in
the orders and payments databases: the gateway's relay reads the same columns).

Revision ID: 0004
"""

from shared.migration_steps import outbox_envelope_column, outbox_payload_column

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    outbox_envelope_column()


def downgrade() -> None:
    outbox_payload_column()
