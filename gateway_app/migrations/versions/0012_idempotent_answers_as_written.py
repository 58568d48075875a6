"""Idempotency keys keep the first answer's body as the JSON text it was answered with, which a
replay answers as it is, byte for byte (shared.idempotency), instead of as jsonb, which reordered
its keys.

Revision ID: 0012
"""

from shared.migration_steps import (keep_idempotent_answers_as_jsonb,
                                    keep_idempotent_answers_as_written)

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    keep_idempotent_answers_as_written()


def downgrade() -> None:
    keep_idempotent_answers_as_jsonb()
