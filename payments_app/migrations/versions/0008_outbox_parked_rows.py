"""Outbox rows whose message the producer will never take are parked, and hold back only the
later rows with their topic and key (shared.outbox.CLAIM_ROWS).

Revision ID: 0008
"""

from shared.migration_steps import drop_outbox_parking, park_outbox_rows

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    park_outbox_rows()


def downgrade() -> None:
    drop_outbox_parking()
