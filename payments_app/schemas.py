"""The Payments API's request and response schemas, and the errors of its operations beyond those
of every request (all also documented by the gateway)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from shared.documented_errors import IDEMPOTENCY_ERRORS, DocumentedError
from shared.fields import Amount
from shared.money import MAX_BALANCE

ACCOUNT_EXISTS = DocumentedError(409, "ACCOUNT_EXISTS", "the caller has an account already")
ACCOUNT_NOT_FOUND = DocumentedError(404, "ACCOUNT_NOT_FOUND", "the caller has no account")
BALANCE_LIMIT_EXCEEDED = DocumentedError(422, "BALANCE_LIMIT_EXCEEDED",
                                         f"the balance would pass {MAX_BALANCE}")
OPEN_ACCOUNT_ERRORS = (ACCOUNT_EXISTS,)
DEPOSIT_ERRORS = (ACCOUNT_NOT_FOUND, BALANCE_LIMIT_EXCEEDED, *IDEMPOTENCY_ERRORS)
BALANCE_ERRORS = (ACCOUNT_NOT_FOUND,)


class DepositSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, example="100.00")


class AccountSchema(Schema):
    # (an answer: every field always sent, as orders_app.schemas' are)
    user_id = fields.String(required=True)
    balance = Amount.answered(f"A string with 2 decimals, at most {MAX_BALANCE}", required=True)
