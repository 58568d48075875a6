"""Who is calling: the user named by the `X-User-ID` header, checked on every API request."""

from __future__ import annotations

from flask import g, request

from shared.errors import Unauthorized
from shared.fields import USER_ID_PATTERN

USER_ID_HEADER = "X-User-ID"


def require_user_id() -> str:
    """The caller's user id; 401 when the header is missing or malformed."""
    user_id = request.headers.get(USER_ID_HEADER)
    if user_id is None:
        raise Unauthorized(f"The {USER_ID_HEADER} header is required.", code="MISSING_USER_ID")
    if not USER_ID_PATTERN.match(user_id):
        raise Unauthorized(
            f"The {USER_ID_HEADER} header must be 1 to 64 characters of A-Za-z0-9_.-",
            code="INVALID_USER_ID",
        )
    g.user_id = user_id
    return user_id


def identify_caller() -> None:
    """A `before_request` hook: sets `g.user_id` or answers 401."""
    require_user_id()
