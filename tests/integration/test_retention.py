"""What is kept for a while is pruned by beat once its retention is over: the orders and payments
services' idempotency keys (a day), the gateway's notifications (30 days) and its signed-out
tokens (once expired), in short transactions, each by the clock its rows were timed by."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy import func, select, text

import celeryconfig
from gateway_app import notifications
from gateway_app.models import Notification, SignedOutToken
from gateway_app.sign_out import FORGOTTEN_AFTER_EXPIRY_SECONDS, sign_out
from gateway_app.tokens import VerifiedToken
from shared import idempotency
from shared.db import db, transaction
from shared.idempotency import REPLAYED, REPLAYED_HEADER, IdempotencyKey, run_idempotently
from tasks.retention import (prune_idempotency_keys, prune_notifications,
                             prune_signed_out_tokens)
from tasks.services import service_app
from tests.clock_tools import running_off_by
from tests.integration.test_gateway import _status_changes


def _place(user: str, key: str, amount: str) -> tuple:
    """What `POST /orders` with an Idempotency-Key does around its work, the work a counter."""
    with service_app("orders").app_context():
        return run_idempotently(user_id=user, endpoint="POST /retention-test", key=key,
                                args={"amount": amount},
                                respond=lambda _session: ({"amount": amount}, 202),
                                invalidates=f"retention-test:{user}")


def _age(service: str, table: str, where: str, params: dict, days: int) -> None:
    with service_app(service).app_context(), transaction() as session:
        session.execute(text(f"UPDATE {table} SET created_at = now() - make_interval(days => "
                             f":days) WHERE {where}"), {**params, "days": days})


def _keys(user: str) -> list[str]:
    with service_app("orders").app_context():
        return sorted(db.session.scalars(select(IdempotencyKey.key)
                                         .where(IdempotencyKey.user_id == user)))


def test_expired_idempotency_keys_are_pruned_and_a_key_is_then_a_new_request(
        settings, user_id, monkeypatch):
    monkeypatch.setattr("tasks.retention.PRUNED_PER_TRANSACTION", 2)  # so that it takes turns
    for key in ("old-1", "old-2", "old-3", "fresh"):
        _place(user_id, key, "1.00")
    _age("orders", "idempotency_keys", "user_id = :user AND key LIKE :old",
         {"user": user_id, "old": "old-%"}, days=2)
    assert _place(user_id, "old-1", "1.00") == ({"amount": "1.00"}, 202)  # replayed: still kept

    assert prune_idempotency_keys.apply(args=("orders",)).get() >= 3
    assert _keys(user_id) == ["fresh"]
    # Expired, the key is free: another body under it is a new request, not a 422.
    assert _place(user_id, "old-1", "9.00") == ({"amount": "9.00"}, 202)
    assert _keys(user_id) == ["fresh", "old-1"]


def test_a_key_pruned_between_its_claim_and_its_read_is_claimed_anew(settings, user_id,
                                                                     monkeypatch):
    """The request found the key recorded, then (pruned as it expired) could not read it: it is a
    new request, not a 500."""
    claims = []
    claim = idempotency._claim

    def lost_race_once(*args):
        claims.append(args)
        return claim(*args) if len(claims) > 1 else False  # as if the row were there, then gone

    monkeypatch.setattr(idempotency, "_claim", lost_race_once)
    assert _place(user_id, "raced", "2.00") == ({"amount": "2.00"}, 202)
    assert len(claims) == 2 and _keys(user_id) == ["raced"]


def _workers_clock_a_retention_ahead(monkeypatch, retention_seconds: float) -> None:
    """The pruners' worker's clock (tasks.retention's `datetime`) a retention and a minute ahead
    of the database's: by it, what the database stamped moments ago is past its retention."""
    ahead = timedelta(seconds=retention_seconds, minutes=1)
    monkeypatch.setattr("tasks.retention.datetime", running_off_by(ahead))


def test_a_pruner_whose_clock_runs_ahead_of_the_databases_keeps_a_key_recorded_just_now(
        settings, payments_flask_app, user_id, monkeypatch):
    """A key's `created_at` is the database's clock, and so is the pruner's cutoff: taken on a
    worker's clock a day ahead, it pruned the key of a top-up moments after it was recorded, and
    the client's retry under that key deposited again (200.00)."""
    client = payments_flask_app.test_client()
    assert client.post("/accounts", signed_as=user_id).status_code == 201
    keyed = {"Idempotency-Key": f"top-up-{uuid.uuid4().hex}"}
    first = client.post("/accounts/deposit", json={"amount": "100"}, headers=keyed,
                        signed_as=user_id)
    assert first.status_code == 200 and first.get_json()["balance"] == "100.00"

    _workers_clock_a_retention_ahead(monkeypatch, settings.idempotency_key_retention_seconds)
    prune_idempotency_keys.apply(args=("payments",)).get()

    retry = client.post("/accounts/deposit", json={"amount": "100"}, headers=keyed,
                        signed_as=user_id)
    assert retry.get_data() == first.get_data()
    assert retry.headers.get(REPLAYED_HEADER) == REPLAYED
    balance = client.get("/accounts/balance", signed_as=user_id)
    assert balance.get_json()["balance"] == "100.00"


def test_a_pruner_whose_clock_runs_ahead_of_the_databases_keeps_a_notification_made_just_now(
        settings, monkeypatch):
    """A notification's `created_at` is the gateway database's clock, and so is the pruner's
    cutoff: on a worker's clock 30 days ahead, it pruned the notifications made moments before,
    which a page reconnecting could no longer catch up on."""
    user = f"user-{uuid.uuid4().hex[:10]}"
    with service_app("gateway").app_context():
        with transaction() as session:
            notifications.on_order_status_changes(session, _status_changes(user))
        made = notifications.notifications_after(user, 0, 10)
    assert len(made) == 1

    _workers_clock_a_retention_ahead(monkeypatch, settings.notification_retention_seconds)
    prune_notifications.apply(args=("gateway",)).get()

    with service_app("gateway").app_context():
        assert notifications.notifications_after(user, 0, 10) == made


def test_old_notifications_are_pruned_oldest_first(settings, monkeypatch):
    monkeypatch.setattr("tasks.retention.PRUNED_PER_TRANSACTION", 2)
    user = f"user-{uuid.uuid4().hex[:10]}"
    with service_app("gateway").app_context():
        with transaction() as session:
            notifications.on_order_status_changes(session, _status_changes(*[user] * 5))
        kept = [item["id"] for item in notifications.notifications_after(user, 0, 10)]
    # Everyone's notifications older than these are aged too, so the oldest by id are old.
    _age("gateway", "notifications", "id <= :last", {"last": kept[2]}, days=31)

    assert prune_notifications.apply(args=("gateway",)).get() >= 3
    with service_app("gateway").app_context():
        left = [item["id"] for item in notifications.notifications_after(user, 0, 10)]
        oldest = db.session.scalar(select(func.min(Notification.id)))
    assert left == kept[3:] and oldest == kept[3]


def test_signed_out_tokens_are_forgotten_a_while_after_they_expire(settings):
    """Expired, a token is refused as expired: its sign-out is kept only for a gateway whose clock
    runs behind, FORGOTTEN_AFTER_EXPIRY_SECONDS."""
    now = time.time()
    expired_at = {"long ago": now - FORGOTTEN_AFTER_EXPIRY_SECONDS - 60,
                  "just now": now - 60, "not yet": now + 600}
    digests = {name: uuid.uuid4().bytes * 2 for name in expired_at}
    with service_app("gateway").app_context():
        for name, expires_at in expired_at.items():
            sign_out(VerifiedToken(f"usr_{name}", expires_at, digests[name]))

    assert prune_signed_out_tokens.apply(args=("gateway",)).get() >= 1
    with service_app("gateway").app_context():
        kept = set(db.session.scalars(select(SignedOutToken.digest).where(
            SignedOutToken.digest.in_(digests.values()))))
    assert kept == {digests["just now"], digests["not yet"]}


def test_beat_prunes_the_services_keys_and_the_gateways_notifications_and_sign_outs(settings):
    scheduled = {(entry["task"], entry["args"]) for entry in celeryconfig.beat_schedule.values()}
    pruned_keys = {args for task, args in scheduled if task == prune_idempotency_keys.name}
    assert pruned_keys == {("orders",), ("payments",)}  # the gateway keeps none
    assert (prune_notifications.name, ("gateway",)) in scheduled
    assert (prune_signed_out_tokens.name, ("gateway",)) in scheduled


def test_the_gateways_keys_pruned_by_a_beat_of_the_release_before_are_no_error(settings):
    """During the upgrade, a beat of the release before still sends the gateway's key pruning:
    its table dropped (gateway revision 0013), the run does nothing."""
    assert prune_idempotency_keys.apply(args=("gateway",)).get() == 0
