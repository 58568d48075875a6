"""The Payments API's request and response schemas (also documented by the gateway)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from shared.fields import Amount
from shared.money import MAX_BALANCE


class EmptySchema(Schema):
    class Meta:
        unknown = RAISE


class DepositSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, metadata={"example": "100.00"})


class AccountSchema(Schema):
    user_id = fields.String()
    balance = Amount.answered(f"A string with 2 decimals, at most {MAX_BALANCE}")
