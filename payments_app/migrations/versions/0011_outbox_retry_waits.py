"""Outbox rows the broker refused wait longer after each refusal before they are tried again, and
hold back the later rows with their topic and key until they are sent, so that refused rows at the
head of the table no longer stop the relay (shared.outbox.relaying.CLAIM_ROWS).

Revision ID: 0011
"""

from shared.migration_steps import add_outbox_retry_waits, drop_outbox_retry_waits

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    add_outbox_retry_waits()


def downgrade() -> None:
    drop_outbox_retry_waits()
