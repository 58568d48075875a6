"""Outbox rows keep the whole message as the relay sends it, serialised once by the writer.

Revision ID: 0005
"""

from shared.migration_steps import outbox_envelope_column, outbox_payload_column

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    outbox_envelope_column()


def downgrade() -> None:
    outbox_payload_column()
