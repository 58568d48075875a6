"""Pruners that beat runs, each deleting what is kept past its retention in short transactions:
idempotency keys in the orders and payments databases, notifications and signed-out tokens in
the gateway's. (The inbox's pruner is with the inbox's tasks, tasks/inbox.py, and runs here too.) A
pruner that loses its database connection says so once per outage (DatabaseOutageLog), and the
next run prunes the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from flask import current_app
from sqlalchemy.orm import Session

from shared.config import SERVICES_KEEPING_IDEMPOTENCY_KEYS
from shared.db import DatabaseOutageLog, transaction
from shared.idempotency import prune_expired_keys
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

# Rows a pruner deletes in one transaction: a first run on a full table stays a series of short
# transactions.
PRUNED_PER_TRANSACTION = 10_000

Prune = Callable[[Session, datetime, int], int]

# What this process's runs of each pruner (a service, and what it prunes there) have said of its
# database's outage.
_DATABASE_OUTAGES: dict[tuple[str, str], DatabaseOutageLog] = {}


def prune_in_transactions(service: str, what: str, prune: Prune,
                          retention_seconds: float) -> int:
    """Run `prune` (session, cutoff, limit -> rows deleted) for what was kept over
    `retention_seconds` ago, a transaction of PRUNED_PER_TRANSACTION rows at a time, until it
    deletes fewer; logs and returns how many rows it deleted in all. A lost database connection
    ends the run with what it had deleted, said once per outage; any other error is raised."""
    outage = _DATABASE_OUTAGES.setdefault(
        (service, what), DatabaseOutageLog(log, f"the {service} pruner of {what}"))
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=retention_seconds)
    pruned = 0
    try:
        while True:
            with transaction() as session:
                deleted = prune(session, cutoff, PRUNED_PER_TRANSACTION)
            pruned += deleted
            if deleted < PRUNED_PER_TRANSACTION:
                break
    except Exception as exc:
        # The next run, beat's next interval on, prunes the rest: raised, Celery would log the
        # lost connection as unexpected, traceback and all, at every run while the database is away.
        if not outage.said_if_lost(exc):
            raise
    else:
        outage.back()
    if pruned:
        log.info("%s: pruned %d %s", service, pruned, what)
    return pruned


@app.task(name="hseshop.prune_idempotency_keys", base=ServiceTask, ignore_result=True)
def prune_idempotency_keys(service: str) -> int:
    """Delete the service's idempotency keys recorded over IDEMPOTENCY_KEY_RETENTION_SECONDS ago.
    The gateway keeps none (its table is dropped: gateway revision 0013), and beat prunes it no
    more; one run for it that a beat of the release before sent, during the upgrade, does
    nothing."""
    if service not in SERVICES_KEEPING_IDEMPOTENCY_KEYS:
        return 0
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
