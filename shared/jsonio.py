"""JSON for the HTTP APIs: numbers are read as `Decimal` (never float), NaN and Infinity are
refused, and Decimals, UUIDs and datetimes are written in their wire forms."""

from __future__ import annotations

import json
from decimal import Decimal

from flask.json.provider import DefaultJSONProvider


def _refuse_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a valid JSON number", name, 0)


def loads_strict(text: str | bytes):
    """Parse JSON with numbers as Decimal; NaN and Infinity raise JSONDecodeError."""
    return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)


class StrictDecimalJSONProvider(DefaultJSONProvider):
    sort_keys = False

    def loads(self, s, **kwargs):
        if kwargs:
            return json.loads(s, **kwargs)
        return loads_strict(s)

    @staticmethod
    def default(o):
        if isinstance(o, Decimal):
            return str(o)
        return DefaultJSONProvider.default(o)
