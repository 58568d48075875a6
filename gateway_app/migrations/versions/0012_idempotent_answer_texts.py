"""Idempotency keys keep the first answer's body as the JSON text it was answered with as well,
which a replay reads back in its order (shared.idempotency): jsonb reordered its keys.

Revision ID: 0012
"""

from shared.migration_steps import add_idempotent_answer_texts, drop_idempotent_answer_texts

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    add_idempotent_answer_texts()


def downgrade() -> None:
    drop_idempotent_answer_texts()
