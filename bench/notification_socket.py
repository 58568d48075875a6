"""How a client opens the gateway's notification socket (README, Live updates): a ticket asked for
with its bearer token, then the socket's URL with the ticket, `after` the last id seen. The chaos
soak's followers and the tests open it so."""

from __future__ import annotations

import requests


def ask_for_a_ticket(gateway_url: str, token: str, timeout: float = 10) -> requests.Response:
    """The gateway's answer to POST /api/notifications/tickets with `token`: 201 {"ticket",
    "expires_in"}, or a refusal (401 for a token expired or signed out, 429, 503)."""
    # On a connection of its own: a socket is often asked for after a wait of some seconds, and
    # gunicorn's keep-alive may close a kept connection as the POST is sent on it (a reset, which
    # requests does not retry for a POST).
    return requests.post(f"{gateway_url}/api/notifications/tickets", timeout=timeout,
                         headers={"Authorization": f"Bearer {token}", "Connection": "close"})


def socket_url(gateway_url: str, ticket: str, after: int | None = None) -> str:
    """The socket's URL on `gateway_url` (http://...) for `ticket`, `after` an id if given."""
    url = f"{gateway_url.replace('http://', 'ws://', 1)}/api/notifications/ws?ticket={ticket}"
    return url if after is None else f"{url}&after={after}"
