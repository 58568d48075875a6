"""Pruners that beat runs, each deleting what is kept past its retention in short transactions:
idempotency keys in every service's database, notifications and signed-out tokens in the
gateway's. (The inbox's pruner is with the inbox's tasks, tasks/inbox.py.)"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from flask import current_app
from sqlalchemy.orm import Session

from shared.db import transaction
from shared.idempotency import prune_expired_keys
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

# Rows a pruner deletes in one transaction: a first run on a full table stays a series of short
# transactions.
PRUNED_PER_TRANSACTION = 10_000

Prune = Callable[[Session, datetime, int], int]


def prune_in_transactions(service: str, what: str, prune: Prune,
                          retention_seconds: float) -> int:
    """Run `prune` (session, cutoff, limit -> rows deleted) for what was kept over
    `retention_seconds` ago, a transaction of PRUNED_PER_TRANSACTION rows at a time, until it
    deletes fewer; logs and returns how many rows it deleted in all."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=retention_seconds)
    pruned = 0
    while True:
        with transaction() as session:
            deleted = prune(session, cutoff, PRUNED_PER_TRANSACTION)
        pruned += deleted
        if deleted < PRUNED_PER_TRANSACTION:
            break
    if pruned:
        log.info("%s: pruned %d %s", service, pruned, what)
    return pruned


@app.task(name="hseshop.prune_idempotency_keys", base=ServiceTask, ignore_result=True)
def prune_idempotency_keys(service: str) -> int:
    """Delete the service's idempotency keys recorded over IDEMPOTENCY_KEY_RETENTION_SECONDS ago."""
    settings = current_app.extensions["hseshop.settings"]
    return prune_in_transactions(service, "expired idempotency keys", prune_expired_keys,
                                 settings.idempotency_key_retention_seconds)


@app.task(name="hseshop.prune_notifications", base=ServiceTask, ignore_result=True)
def prune_notifications(service: str) -> int:
    """Delete the notifications kept over NOTIFICATION_RETENTION_SECONDS ago (`service` is the
    gateway, whose database keeps them: every task names its service, its queue)."""
    from gateway_app.notifications import prune_old_notifications

    settings = current_app.extensions["hseshop.settings"]
    return prune_in_transactions(service, "old notifications", prune_old_notifications,
                                 settings.notification_retention_seconds)


@app.task(name="hseshop.prune_signed_out_tokens", base=ServiceTask, ignore_result=True)
def prune_signed_out_tokens(service: str) -> int:
    """Forget the signed-out tokens that expired over FORGOTTEN_AFTER_EXPIRY_SECONDS ago (`service`
    is the gateway, as for prune_notifications)."""
    from gateway_app.sign_out import FORGOTTEN_AFTER_EXPIRY_SECONDS, prune_expired_sign_outs

    return prune_in_transactions(service, "expired signed-out tokens", prune_expired_sign_outs,
                                 FORGOTTEN_AFTER_EXPIRY_SECONDS)
