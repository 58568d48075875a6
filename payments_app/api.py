"""The Payments HTTP API: routes that parse the request and call the shared endpoint operations."""

from __future__ import annotations

from flask import g, jsonify

from payments_app import endpoints
from payments_app.schemas import (BALANCE_ERRORS, DEPOSIT_ERRORS, OPEN_ACCOUNT_ERRORS,
                                  OPENED_ACCOUNT_LINKS, AccountSchema, DepositSchema)
from shared.caller_deadline import CALLER_GAVE_UP, DEADLINE_PARAMETER
from shared.documented_errors import SERVICE_OPERATION_ERRORS, SIGNATURE_USED
from shared.http_api import Blueprint, EmptySchema
from shared.idempotency import (IDEMPOTENCY_KEY_PARAMETER, REPLAYED_RESPONSE_HEADERS,
                                idempotency_key_from_request)

blueprint = Blueprint("accounts", __name__, url_prefix="/accounts",
                      description="Accounts, deposits and balances",
                      errors=SERVICE_OPERATION_ERRORS)


@blueprint.post("")
@blueprint.arguments(EmptySchema, required=False)
@blueprint.doc(parameters=[DEADLINE_PARAMETER])
@blueprint.response(201, AccountSchema, links=OPENED_ACCOUNT_LINKS)
@blueprint.errors(*OPEN_ACCOUNT_ERRORS, CALLER_GAVE_UP)
def open_account(_args):
    """Open the caller's account (one per user), with a zero balance."""
    return jsonify(endpoints.open_account(g.user_id)), 201


@blueprint.post("/deposit")
@blueprint.arguments(DepositSchema)
@blueprint.doc(parameters=[IDEMPOTENCY_KEY_PARAMETER, DEADLINE_PARAMETER])
@blueprint.response(200, AccountSchema, headers=REPLAYED_RESPONSE_HEADERS)
@blueprint.errors(*DEPOSIT_ERRORS, CALLER_GAVE_UP, SIGNATURE_USED)
def deposit(args):
    """Top up the caller's account."""
    return jsonify(endpoints.deposit(g.user_id, args, idempotency_key_from_request()))


@blueprint.get("/balance")
@blueprint.doc(parameters=[DEADLINE_PARAMETER])
@blueprint.response(200, AccountSchema)
@blueprint.errors(*BALANCE_ERRORS)
def balance():
    """The caller's balance."""
    return jsonify(endpoints.balance(g.user_id))
