"""The notifications WebSocket in the gateway's OpenAPI document, where no blueprint puts it (it is
served by flask-sock: gateway_app/notifications.py): its handshake's parameters, what it answers
instead of switching protocols, and what the socket then carries."""

from __future__ import annotations

from gateway_app.notification_document import (NOTIFICATION, NOTIFICATION_ID_FORMAT,
                                                NOTIFICATIONS_MISSED_SCHEMA)
from shared.documented_errors import (BODY_TOO_LARGE, DATABASE_UNAVAILABLE_OR_BUSY, RETRY_AFTER,
                                      SEC_WEBSOCKET_VERSION, UPGRADE, DocumentedError,
                                      openapi_error_responses)

WEBSOCKET_REQUIRED = DocumentedError(
    426, "WEBSOCKET_REQUIRED", "asked without a WebSocket handshake (`Upgrade: websocket`)",
    headers=(UPGRADE,))
WEBSOCKET_VERSION = DocumentedError(
    426, "WEBSOCKET_VERSION", "a handshake of a WebSocket version other than 13",
    headers=(UPGRADE, SEC_WEBSOCKET_VERSION))
BAD_WEBSOCKET_HANDSHAKE = DocumentedError(
    400, "BAD_WEBSOCKET_HANDSHAKE", "a handshake without its key, one that is no GET (a HEAD), "
    "or one that cannot be answered (its Host header, an extension's parameters)")
HANDSHAKES_LIMITED = DocumentedError(
    429, "RATE_LIMITED", "too many socket handshakes this minute from the client's address",
    headers=(RETRY_AFTER,))
SOCKET_ERRORS = (WEBSOCKET_REQUIRED, WEBSOCKET_VERSION, BAD_WEBSOCKET_HANDSHAKE, BODY_TOO_LARGE,
                 HANDSHAKES_LIMITED, *DATABASE_UNAVAILABLE_OR_BUSY)

_DESCRIPTION = """\
Open with a WebSocket handshake. Each message the socket then sends is one notification, JSON, as
`GET /api/notifications` lists them (`Notification`): with `after`, first every one newer than
that id, then each one as it happens; without it, each one from the moment the handshake is
answered. Where some notifications after the id it goes on from were pruned before it sent
them (the page was away longer than they are kept: NOTIFICATION_RETENTION_SECONDS, 30 days
unless set), it sends `{{"type": "NotificationsMissed", "through": <id>}}` (`NotificationsMissed`,
with no `id`; `through` the newest pruned), once for them, before the first notification after
them: its first message, or, where they were pruned while it was sending its catch-up (a page of
notifications at a time), after the older ones already sent. Then what is left: go on after
`through` (a socket opened `after` it is not told again) and read the whole state again (the
orders, the balance).
The page sends nothing: what it sends is read and dropped, but for a message too
long (1009, below). A socket sends a WebSocket ping every {ping_seconds:g} s, whatever else it
sends (a control frame, no message), which a browser answers with a pong by itself, as any client
following RFC 6455 does: a proxy on the way that closes a connection quiet for a while (nginx's
`proxy_read_timeout`, 60 s by default) then keeps it. A client that has not answered a ping with
a pong within {pong_seconds:g} s is taken for gone, and its socket closed (1011).

A browser's WebSocket cannot send headers: open it with a `ticket` from
`POST /api/notifications/tickets` (asked for with the bearer token, good for this one socket
within its `expires_in` seconds, on any gateway instance), one for each (re)connect. The bearer
token itself in the query (`access_token`) is still taken, for clients of before, but is
discouraged: a URL is written into the access logs of the proxies on its way, the token valid
for hours there. Give one of the two, not both. A socket is closed with:
- 1008 when the ticket is unknown, used or expired (ask for another), when the token (the
  ticket's, or `access_token`) is refused, when `after` is no notification id, when a parameter
  is given more than once or both `ticket` and `access_token` are, and when the token expires or
  is signed out (`POST /api/auth/logout`; sign in again, then reconnect): a ticket does not
  outlive its token's expiry, nor open a socket once its token is signed out;
- 1013 past the user's rate limit (opened with `access_token`: a ticket was counted when asked
  for) or its socket limits, or its address's: reconnect later;
- 1011 when the gateway loses Redis or its database, or fails otherwise, or when the client has
  left a ping unanswered {pong_seconds:g} s: reconnect;
- 1012 when the gateway process is stopping (a deploy, a restart): reconnect at once;
- 1009 when the page sends a message over {max_message:,} characters (bytes, if binary), in one
  frame or several.

A handshake past its client address's handshakes this minute is answered 429 `RATE_LIMITED` (with
Retry-After), before its ticket or token is read, and never upgraded: a browser learns only that
its socket closed (1006), but the ticket was refused before (429 `SOCKET_HANDSHAKES_LIMITED`,
with Retry-After) unless another page of the address took the last handshake meanwhile.

A ticket is spent by any handshake that brings it, whether or not it opens a socket: one
refused before the ticket is read (that 429, a 400 or 426 for a handshake the gateway cannot
take, a 1008 for a parameter given twice or both `ticket` and `access_token`) spends it too, so
ask for a new ticket for each try."""


def document_socket(api, rule, max_message: int, ping_seconds: float,
                    pong_seconds: float) -> None:
    """Put the socket the URL rule `rule` serves in `api`'s OpenAPI document; a message from the
    page over `max_message` characters closes it, it pings the page every `ping_seconds`, and
    closes one that has left a ping unanswered `pong_seconds`."""
    api.spec.path(rule=rule, parameters=[], operations={"get": {
        "tags": ["notifications"],
        "summary": "The signed-in user's notifications, live, over a WebSocket",
        "description": _DESCRIPTION.format(max_message=max_message, ping_seconds=ping_seconds,
                                           pong_seconds=pong_seconds),
        "security": [],  # (its ticket, or its token, is a query parameter)
        # Each message the socket sends, as a schema (OpenAPI has no word for a socket's
        # messages: an extension's).
        "x-socket-messages": {"oneOf": [NOTIFICATION, NOTIFICATIONS_MISSED_SCHEMA]},
        "parameters": [
            {"name": "ticket", "in": "query", "required": False,
             "description": "A ticket from `POST /api/notifications/tickets`: good for one "
                            "socket, within its `expires_in` seconds (the way to connect; give "
                            "it or `access_token`)",
             "schema": {"type": "string"}},
            {"name": "access_token", "in": "query", "required": False, "deprecated": True,
             "description": "The bearer token signing in gave, for clients of before: "
                            "discouraged, a URL being written into proxies' access logs (give "
                            "it or `ticket`)",
             "schema": {"type": "string"}},
            {"name": "after", "in": "query", "required": False,
             "description": "Send every notification newer than this id first",
             "schema": {"type": "integer", **NOTIFICATION_ID_FORMAT, "minimum": 0}},
        ],
        "responses": {
            "101": {"description": "Switching Protocols: the socket is open"},
            **openapi_error_responses(SOCKET_ERRORS),
            "default": api.DEFAULT_ERROR_RESPONSE_NAME,  # (a reference to every operation's own)
        },
    }})
