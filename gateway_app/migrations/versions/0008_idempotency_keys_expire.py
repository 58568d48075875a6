"""Idempotency keys expire: pruned once older than IDEMPOTENCY_KEY_RETENTION_SECONDS
(shared.idempotency.prune_expired_keys), found by an index of when they were recorded.

Revision ID: 0008
"""

from shared.migration_steps import drop_idempotency_keys_age_index, index_idempotency_keys_by_age

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    index_idempotency_keys_by_age()


def downgrade() -> None:
    drop_idempotency_keys_age_index()
