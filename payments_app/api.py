"""The Payments HTTP API: accounts, deposits and balances, the balance served through the cache."""

from __future__ import annotations

from flask import g, jsonify

from payments_app import service
from payments_app.schemas import AccountSchema, DepositSchema, EmptySchema
from shared.cache import app_cache
from shared.db import db, transaction
from shared.http_api import Blueprint
from shared.idempotency import idempotency_key_from_request, run_idempotently

blueprint = Blueprint("accounts", __name__, url_prefix="/accounts",
                      description="Accounts, deposits and balances")


ACCOUNT = AccountSchema()


@blueprint.post("")
@blueprint.arguments(EmptySchema)
@blueprint.response(201, AccountSchema)
def open_account(_args):
    """Open the caller's account (one per user), with a zero balance."""
    with transaction() as session:
        account = service.open_account(session, user_id=g.user_id)
        return ACCOUNT.dump(account)


@blueprint.post("/deposit")
@blueprint.arguments(DepositSchema)
@blueprint.response(200, AccountSchema)
def deposit(args):
    """Top up the caller's account."""
    key = idempotency_key_from_request()
    with transaction() as session:
        body, status = run_idempotently(
            session, user_id=g.user_id, key=key, args=args,
            respond=lambda: (ACCOUNT.dump(service.deposit(session, user_id=g.user_id, **args)), 200),
        )
    return jsonify(body), status


@blueprint.get("/balance")
@blueprint.response(200, AccountSchema)
def balance():
    """The caller's balance."""
    body = app_cache().read(
        service.balance_cache_namespace(g.user_id), "account",
        lambda: ACCOUNT.dump(service.get_account(db.session, user_id=g.user_id)))
    return jsonify(body)
