"""The notifications WebSocket in the gateway's OpenAPI document, where no blueprint puts it (it is
served by flask-sock: gateway_app/notifications.py): its handshake's parameters, what it answers
instead of switching protocols, and what the socket then carries."""

from __future__ import annotations

from shared.documented_errors import (BODY_TOO_LARGE, DATABASE_UNAVAILABLE_OR_BUSY,
                                      DocumentedError, openapi_error_responses)

WEBSOCKET_REQUIRED = DocumentedError(
    426, "WEBSOCKET_REQUIRED", "asked without a WebSocket handshake (`Upgrade: websocket`)")
WEBSOCKET_VERSION = DocumentedError(
    426, "WEBSOCKET_VERSION", "a handshake of a WebSocket version other than 13")
BAD_WEBSOCKET_HANDSHAKE = DocumentedError(
    400, "BAD_WEBSOCKET_HANDSHAKE", "a handshake without its key, or one that cannot be "
    "answered (its Host header, an extension's parameters)")
HANDSHAKES_LIMITED = DocumentedError(
    429, "RATE_LIMITED", "too many socket handshakes this minute from the client's address",
    retry_after=True)
SOCKET_ERRORS = (WEBSOCKET_REQUIRED, WEBSOCKET_VERSION, BAD_WEBSOCKET_HANDSHAKE, BODY_TOO_LARGE,
                 HANDSHAKES_LIMITED, *DATABASE_UNAVAILABLE_OR_BUSY)

_DESCRIPTION = """\
Open with a WebSocket handshake. Each message the socket then sends is one notification, JSON, as
`GET /api/notifications` lists them (`Notification`): with `after`, first every one newer than
that id, then each one as it happens; without it, each one from the moment the handshake is
answered. The page sends nothing: what it sends is read and dropped, but for a message too
long (1009, below).

The token goes in the query (a browser's WebSocket cannot send headers). A socket is closed with:
- 1008 when the token is refused, when `after` is no notification id, when either is given more
  than once, and when the token expires or is signed out (`POST /api/auth/logout`; sign in
  again, then reconnect);
- 1013 past the user's rate limit or its socket limits, or its address's: reconnect later;
- 1011 when the gateway loses Redis or its database: reconnect;
- 1009 when the page sends a message over {max_message:,} characters (bytes, if binary), in one
  frame or several.

A handshake past its client address's handshakes this minute is answered 429 `RATE_LIMITED` (with
Retry-After), before its token is read, and never upgraded."""


def document_socket(api, rule, max_message: int) -> None:
    """Put the socket the URL rule `rule` serves in `api`'s OpenAPI document; a message from the
    page over `max_message` characters closes it."""
    api.spec.path(rule=rule, parameters=[], operations={"get": {
        "tags": ["notifications"],
        "summary": "The signed-in user's notifications, live, over a WebSocket",
        "description": _DESCRIPTION.format(max_message=max_message),
        "security": [],  # (its token is a query parameter)
        "parameters": [
            {"name": "access_token", "in": "query", "required": True,
             "description": "The bearer token signing in gave", "schema": {"type": "string"}},
            {"name": "after", "in": "query", "required": False,
             "description": "Send every notification newer than this id first",
             "schema": {"type": "integer", "minimum": 0}},
        ],
        "responses": {
            "101": {"description": "Switching Protocols: the socket is open"},
            **openapi_error_responses(SOCKET_ERRORS),
            "default": api.DEFAULT_ERROR_RESPONSE_NAME,  # (a reference to every operation's own)
        },
    }})
