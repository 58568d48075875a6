"""The gateway keeps no idempotency keys: it passes a request's Idempotency-Key on to the orders
and payments services, which keep it (shared.idempotency). Its table, made with the outbox and
inbox every database has, was never written to, by this release or any before it, and is dropped;
beat no longer prunes it (celeryconfig.py).

Revision ID: 0013
"""

from shared.migration_steps import drop_idempotency_keys, recreate_idempotency_keys

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    drop_idempotency_keys()


def downgrade() -> None:
    recreate_idempotency_keys()
