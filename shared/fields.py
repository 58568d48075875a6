"""Marshmallow fields shared by the HTTP APIs and the event contracts."""

from __future__ import annotations

import copy
import re

from marshmallow import ValidationError, fields, validate

from shared.money import (MAX_AMOUNT, PLAIN_AMOUNT, InvalidAmount, format_amount,
                          parse_amount)

# Portable as it is written (the OpenAPI document shows it to clients), and always used with
# fullmatch: `re.match` would let `$` match before a final newline.
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
USER_ID_RULE = "must be 1 to 64 characters of A-Za-z0-9_.-"


class FullMatch(validate.Regexp):
    """marshmallow's Regexp, matching the whole value (Regexp itself uses `re.match`)."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


# The whole numbers a WholeNumber takes: a 64-bit integer's (OpenAPI's `format: int64`, a
# PostgreSQL bigint's).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class WholeNumber(fields.Integer):
    """A whole number as a query parameter writes it, ASCII digits after an optional minus sign,
    or an integer as it comes (a gRPC field), from INT64_MIN to INT64_MAX, documented as
    `format: int64`. (Python's int(), marshmallow's reader, would also take "٥", "1_000", "+5"
    and " 5 ", as the amounts' parser refuses to; and any number of digits, which PostgreSQL
    compares with a bigint as a numeric: an `after` past the largest id read an empty page, where
    it is no id at all.)"""

    _WRITTEN = re.compile(r"-?[0-9]+")
    default_error_messages = {
        "not_int64": f"Must be from {INT64_MIN} to {INT64_MAX} (a 64-bit integer)."}

    def __init__(self, *args, **kwargs):
        kwargs["metadata"] = {"format": "int64", **kwargs.get("metadata", {})}
        super().__init__(*args, **kwargs)

    def _validated(self, value):
        if isinstance(value, str) and not self._WRITTEN.fullmatch(value):
            raise self.make_error("invalid", input=value)
        number = super()._validated(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise self.make_error("not_int64")
        return number


class Amount(fields.Field):
    """Money in, as a JSON number or string; money out, as a string with two decimals."""

    # How the OpenAPI document describes it (apispec copies these from a field's metadata): what
    # parse_amount takes, no more, so that nothing a client builds from the document is refused.
    # A string in its plain form only (parse_amount reads a sign, an exponent, zeros before the
    # digits, spaces around them too); a number as JSON Schema can bound it, but for its decimals:
    # a `multipleOf: 0.01` is checked in floating point by the usual validators (jsonschema, ajv),
    # which then refuse 0.07 (0.07 / 0.01 is 7.000000000000001) and one cent value in nine. The
    # description says it; a number with a third decimal is a 422.
    DOCUMENTED = {
        "description": "Money: a string in plain decimal form, as `\"30.00\"`, or a JSON number;"
                       f" above 0, at most 2 decimals (a number's too, which the schema leaves"
                       f" unchecked), at most {MAX_AMOUNT}; answered as a string with 2 decimals.",
        "oneOf": [
            {"type": "string", "pattern": f"^{PLAIN_AMOUNT.pattern}$"},
            {"type": "number", "exclusiveMinimum": True, "minimum": 0,
             "maximum": int(MAX_AMOUNT)},
        ],
    }

    def __init__(self, *, example: str | None = None, **kwargs):
        documented = copy.deepcopy(self.DOCUMENTED)
        if example is not None:
            # In the string's form, not the field's: Swagger UI shows that one, and fills it in
            # on "Try it out", as it is, where it writes the field's as a number ("amount": 30).
            documented["oneOf"][0]["example"] = example
        kwargs["metadata"] = {**documented, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return parse_amount(value)
        except InvalidAmount as exc:
            raise ValidationError(str(exc)) from None

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else format_amount(value)

    @classmethod
    def answered(cls, description: str = "A string with 2 decimals", **kwargs) -> Amount:
        """An amount only ever answered, documented as what goes out: a string, never a number."""
        return cls(metadata={"description": description,
                             "oneOf": [{"type": "string", "pattern": r"^[0-9]+\.[0-9]{2}$"}]},
                   **kwargs)


class Text(fields.String):
    """Text a client sends that is stored or hashed: no unpaired surrogate (it has no UTF-8 form)
    and, unless `stored=False` (a password, which is only hashed), no NUL character (PostgreSQL's
    text cannot hold one)."""

    # How the OpenAPI documents describe stored text: no NUL (ECMA-262 reads `\u0000` as Python's
    # re does). An unpaired surrogate they cannot refuse without refusing every paired one too (a
    # pattern matches code points in one reader, UTF-16 units in another): each such field's
    # description says it instead.
    DOCUMENTED_STORED = {"pattern": r"^[^\u0000]*$"}
    # What a pattern cannot say, said in words: in the field's description.
    SURROGATES_REFUSED = (
        "A string holding an unpaired UTF-16 surrogate (one of `\\ud800` to `\\udfff` escaped "
        "in the JSON, not as half of a high-low pair) is refused with 422 `VALIDATION_ERROR`: "
        "it is no Unicode text, and no JSON Schema pattern can refuse it.")
    DESCRIBED_STORED = "Text, with no NUL character (`\\u0000`)."

    def __init__(self, *args, stored: bool = True, **kwargs):
        metadata = kwargs.get("metadata", {})
        described = " ".join(filter(None, (metadata.get("description"),
                                           self.DESCRIBED_STORED if stored else None,
                                           self.SURROGATES_REFUSED)))
        kwargs["metadata"] = {**(self.DOCUMENTED_STORED if stored else {}), **metadata,
                              "description": described}
        super().__init__(*args, **kwargs)
        self.stored = stored

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if self.stored and "\x00" in text:
            raise ValidationError("must not contain NUL characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("must be valid Unicode text (no unpaired surrogates)") from None
        return text


class UserId(fields.String):
    """A user id: 1 to 64 characters of A-Za-z0-9_.- (an OpenAPI document shows the pattern)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validators.insert(0, FullMatch(USER_ID_PATTERN, error=USER_ID_RULE))
