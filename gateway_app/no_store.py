"""`Cache-Control: no-store` on every answer under /api: each is one user's own (their orders,
balance and notifications, a token, a socket ticket) or says something of them (a 404 for an order
id, a 401 for a token), and no cache on the way may keep it.

A shared cache should not store an answer to a request with `Authorization` anyway (RFC 9111,
3.5), but that rule is not every cache's: a reverse proxy or CDN told to cache GETs (nginx's
proxy_cache keys on the URL alone and never looks at `Authorization`) served one user's
`GET /api/orders` to the next user who asked for the same URL, and a browser kept each answer on
disk after signing out. The page and the documents keep their own headers."""

from __future__ import annotations

from flask import Flask, Response, request

API_PREFIX = "/api"


def keep_api_answers_out_of_caches(app: Flask) -> None:
    """Every answer `app` gives under /api, errors and HEAD included, over either transport to the
    services, says `Cache-Control: no-store`."""
    app.after_request(_no_store_under_the_api)


def _no_store_under_the_api(response: Response) -> Response:
    if request.path == API_PREFIX or request.path.startswith(f"{API_PREFIX}/"):
        response.headers["Cache-Control"] = "no-store"
    return response
