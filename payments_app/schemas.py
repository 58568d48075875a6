"""The Payments API's request and response schemas (also documented by the gateway)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from shared.fields import Amount


class EmptySchema(Schema):
    class Meta:
        unknown = RAISE


class DepositSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = Amount(required=True, metadata={"example": "100.00"})


class AccountSchema(Schema):
    user_id = fields.String()
    balance = Amount()
