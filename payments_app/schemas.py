"""The Payments API's request and response schemas, the errors of its operations beyond those
of every request, and the links from its answers to the operations that go on with what they
made (all also documented by the gateway)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from shared.documented_errors import IDEMPOTENCY_ERRORS, DocumentedError, kept_under_the_key
from shared.fields import Amount
from shared.money import MAX_BALANCE
from shared.operation_links import link

ACCOUNT_EXISTS = DocumentedError(409, "ACCOUNT_EXISTS", "the caller has an account already")
ACCOUNT_NOT_FOUND = DocumentedError(404, "ACCOUNT_NOT_FOUND", "the caller has no account")
BALANCE_LIMIT_EXCEEDED = DocumentedError(422, "BALANCE_LIMIT_EXCEEDED",
                                         f"the balance would pass {MAX_BALANCE}")
OPEN_ACCOUNT_ERRORS = (ACCOUNT_EXISTS,)
# (A deposit's own refusals are kept under its key, and answered again to a repeat.)
DEPOSIT_ERRORS = (kept_under_the_key(ACCOUNT_NOT_FOUND), kept_under_the_key(BALANCE_LIMIT_EXCEEDED),
                  *IDEMPOTENCY_ERRORS)
BALANCE_ERRORS = (ACCOUNT_NOT_FOUND,)
# The account opened is the caller's own, which these operations take with no parameter (the
# operations named as the views of payments_app/api.py and gateway_app/routes.py are).
OPENED_ACCOUNT_LINKS = {
    "Deposit": link("deposit", "Top the account opened up"),
    "GetBalance": link("balance", "Read the account opened's balance"),
}


class DepositSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, example="100.00")


class AccountSchema(Schema):
    # (an answer: every field always sent, as orders_app.schemas' are)
    user_id = fields.String(required=True)
    balance = Amount.answered(f"A string with 2 decimals, at most {MAX_BALANCE}", required=True)
