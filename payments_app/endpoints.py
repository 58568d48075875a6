"""The Payments operations as every transport serves them (HTTP routes and gRPC methods alike):
validated arguments in, the response body out. Transactions, idempotency and the read cache are
handled here once, around the use cases (a write that honours an Idempotency-Key, in the
transactions of run_idempotently)."""

from __future__ import annotations

from typing import Any

from payments_app import service
from payments_app.schemas import AccountSchema
from shared.cache import app_cache
from shared.db import db, transaction
from shared.idempotency import run_idempotently

ACCOUNT = AccountSchema()


def open_account(user_id: str) -> dict:
    with transaction() as session:
        return ACCOUNT.dump(service.open_account(session, user_id=user_id))


def deposit(user_id: str, args: dict[str, Any], idempotency_key: str | None) -> dict:
    body, _status = run_idempotently(
        user_id=user_id, endpoint="POST /accounts/deposit", key=idempotency_key, args=args,
        invalidates=service.balance_cache_namespace(user_id),
        respond=lambda session: (
            ACCOUNT.dump(service.deposit(session, user_id=user_id, **args)), 200),
    )
    return body


def balance(user_id: str) -> dict:
    return app_cache().read(
        service.balance_cache_namespace(user_id), "account",
        lambda: ACCOUNT.dump(service.get_account(db.session, user_id=user_id)))
