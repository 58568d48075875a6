"""Pruners that beat runs, each deleting what is kept past its retention in short transactions:
idempotency keys in the orders and payments databases, notifications and signed-out tokens in
the gateway's. (The inbox's pruner is with the inbox's tasks, tasks/inbox.py, and prunes through
prune_in_transactions too.) Each measures a retention on the clock its rows were timed by: the
database's for what it stamped (keys, notifications, inbox rows), a worker's for signed-out
tokens, which expire on the gateways' clocks. A pruner that loses its database connection says
so in a line, and the next run prunes the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from flask import current_app
from sqlalchemy.orm import Session

from shared.config import SERVICES_KEEPING_IDEMPOTENCY_KEYS
from shared.db import connection_lost, database_now, said_in_a_line, transaction
from shared.idempotency import prune_expired_keys
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

# Rows a pruner deletes in one transaction: a first run on a full table stays a series of short
# transactions.
PRUNED_PER_TRANSACTION = 10_000

Prune = Callable[[Session, datetime, int], int]
# Now, on the clock what is pruned was timed by, read in the session's transaction.
Clock = Callable[[Session], datetime]


def workers_clock(session: Session) -> datetime:
    """Now by this worker's clock (for rows timed by no database: prune_signed_out_tokens)."""
    return datetime.now(timezone.utc)


def prune_in_transactions(service: str, what: str, prune: Prune,
                          retention_seconds: float, clock: Clock = database_now) -> int:
    """Run `prune` (session, cutoff, limit -> rows deleted) for what was kept over
    `retention_seconds` ago by `clock` (the one the rows were timed by: the database's, unless
    given; on a worker's clock a day ahead of it, the idempotency keys recorded moments before
    were pruned, and a client's retry of a top-up deposited again), a transaction of
    PRUNED_PER_TRANSACTION rows at a time, until it deletes fewer; logs and returns how many rows
    it deleted in all. A lost database connection ends the run with what it
    had deleted, in one WARNING line; any other error is raised."""
    cutoff = None
    pruned = 0
    try:
        while True:
            with transaction() as session:
                if cutoff is None:  # (one cutoff a run, read where a lost connection is said)
                    cutoff = clock(session) - timedelta(seconds=retention_seconds)
                deleted = prune(session, cutoff, PRUNED_PER_TRANSACTION)
            pruned += deleted
            if deleted < PRUNED_PER_TRANSACTION:
                break
    except Exception as exc:
        # The next run, beat's next interval on, prunes the rest: raised, Celery would log the
        # lost connection as unexpected, traceback and all. A line per run (runs are 10 minutes
        # to an hour apart, an outage seldom spans two), not DatabaseOutageLog's once per outage,
        # which tells an outage's end by the next try that works: here, a run an hour later.
        if not connection_lost(exc):
            raise
        log.warning("the %s pruner of %s lost its database connection (%s); the next run prunes"
                    " the rest", service, what, said_in_a_line(exc))
    if pruned:
        log.info("%s: pruned %d %s", service, pruned, what)
    return pruned


@app.task(name="hseshop.prune_idempotency_keys", base=ServiceTask, ignore_result=True)
def prune_idempotency_keys(service: str) -> int:
    """Delete the service's idempotency keys recorded over IDEMPOTENCY_KEY_RETENTION_SECONDS ago,
    by the database's clock, which records them (`created_at`). The gateway keeps none (its table
    is dropped: gateway revision 0013), and beat prunes it no more; a run for it that a beat of
    the release before still sends, during the upgrade, does nothing."""
    if service not in SERVICES_KEEPING_IDEMPOTENCY_KEYS:
        return 0
    settings = current_app.extensions["hseshop.settings"]
    return prune_in_transactions(service, "expired idempotency keys", prune_expired_keys,
                                 settings.idempotency_key_retention_seconds)


@app.task(name="hseshop.prune_notifications", base=ServiceTask, ignore_result=True)
def prune_notifications(service: str) -> int:
    """Delete the notifications kept over NOTIFICATION_RETENTION_SECONDS ago, by the database's
    clock, which stamps them (`created_at`) (`service` is the gateway, whose database keeps them:
    every task names its service, its queue)."""
    from gateway_app.notifications import prune_old_notifications

    settings = current_app.extensions["hseshop.settings"]
    return prune_in_transactions(service, "old notifications", prune_old_notifications,
                                 settings.notification_retention_seconds)


@app.task(name="hseshop.prune_signed_out_tokens", base=ServiceTask, ignore_result=True)
def prune_signed_out_tokens(service: str) -> int:
    """Forget the signed-out tokens that expired over FORGOTTEN_AFTER_EXPIRY_SECONDS ago (`service`
    is the gateway, as for prune_notifications), by this worker's clock, not the database's. A
    token's expiry is a moment on the clock of the gateway that issued it, and every gateway takes
    the token while its own clock is before it: the sign-out must be kept until every gateway's
    clock is past it. No database stamped it, and the database's clock need not agree with the
    hosts' (README: "The database's clock need not agree with theirs"), while the hosts' must agree
    within seconds (the gateway's signed deadline, the workers' retries): a worker's clock is taken
    to be within FORGOTTEN_AFTER_EXPIRY_SECONDS of every gateway's, as theirs are of each other's.
    On the database's, running ahead of the gateways' by more than that, a signed-out token
    unexpired on a gateway's clock would be forgotten and taken again."""
    from gateway_app.sign_out import FORGOTTEN_AFTER_EXPIRY_SECONDS, prune_expired_sign_outs

    return prune_in_transactions(service, "expired signed-out tokens", prune_expired_sign_outs,
                                 FORGOTTEN_AFTER_EXPIRY_SECONDS, clock=workers_clock)
